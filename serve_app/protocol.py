"""The wire protocol: every HTTP request and response body, with ranges and defaults on the
fields, so validation, defaults and the OpenAPI docs come from one place.

Requests convert themselves into the engine's `SamplingParams` once (`to_sampling_params`).
The history records are defined here too, because they are what `GET /conversations/{id}`
returns; the history store produces them directly.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_validator,
    model_validator,
)

from deployments.engine.protocol import TokenizeRequest
from deployments.engine.sampling_params import MAX_LOGIT_BIAS, Constraint, SamplingParams

# The history's records are response bodies too, served as the history deployment returns them.
from deployments.history_records import (  # noqa: F401 - part of this module's protocol
    Conversation,
    ConversationSummary,
    Message,
    MessageRole,
    MessageStatus,
    UserUsage,
)
from deployments.quotas import Limits
from serve_app.tool_calls import forced_constraint

# Defaults of the original API, shared by every route that samples.
DEFAULT_SAMPLE_LEN = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_REPEAT_PENALTY = 1.1
DEFAULT_REPEAT_LAST_N = 64
MAX_SAMPLE_LEN = 8192
MAX_SEED = 2**63 - 1
MAX_CONVERSATION_ID = 2**63 - 1  # SQLite's INTEGER; a larger id names no conversation
MAX_TOP_K = 1_000_000  # more than any vocabulary
# Ends the original API's text stream when the answer fails after it started (a replica died):
# a line of its own, the reason after it. The answer stored in the history has status `failed`.
STREAM_ERROR_MARKER = "[error] "


class RequestModel(BaseModel):
    """Base of every request model: no string in it may hold a lone UTF-16 surrogate. JSON can
    escape one (`"\\ud800"`) but no UTF-8 encoder downstream (the tokenizer, SQLite, the response)
    takes it, so it is refused here naming the field, instead of failing there with a 5xx."""

    @field_validator("*")
    @classmethod
    def _is_unicode_text(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("is not Unicode text: it holds a lone surrogate such as \\ud800") from None
        return value


class GenerationParameters(RequestModel):
    """The original API's sampling fields. Every one may be omitted or null and then takes its
    default. Unknown fields are ignored so that old clients keep working."""

    model_config = ConfigDict(extra="ignore")

    sample_len: int | None = Field(
        default=None, ge=1, le=MAX_SAMPLE_LEN, description=f"Most tokens to generate (default {DEFAULT_SAMPLE_LEN})."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=5.0, description=f"0 is greedy (default {DEFAULT_TEMPERATURE}).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description=f"Nucleus sampling (default {DEFAULT_TOP_P}).")
    repeat_penalty: float | None = Field(
        default=None, gt=0.0, le=10.0, description=f"1 disables it (default {DEFAULT_REPEAT_PENALTY})."
    )
    repeat_last_n: int | None = Field(
        default=None, ge=0, le=MAX_SAMPLE_LEN, description=f"Window of the repeat penalty (default {DEFAULT_REPEAT_LAST_N})."
    )
    model: str | None = Field(default=None, description="Model name or alias; default: the first configured model.")
    revision: str | None = Field(default=None, description="Must match the served revision if given.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Same seed and request, same answer.")

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.sample_len or DEFAULT_SAMPLE_LEN,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p or DEFAULT_TOP_P,
            repeat_penalty=self.repeat_penalty or DEFAULT_REPEAT_PENALTY,
            repeat_last_n=DEFAULT_REPEAT_LAST_N if self.repeat_last_n is None else self.repeat_last_n,
            seed=self.seed,
        )

    def stored_parameters(self, model: str, revision: str) -> dict[str, Any]:
        """The parameters recorded with the answer: what was actually used, defaults filled in."""
        params = self.to_sampling_params()
        return {
            "sample_len": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "repeat_penalty": params.repeat_penalty,
            "repeat_last_n": params.repeat_last_n,
            "seed": params.seed,
            "model": model,
            "revision": revision,
        }


class GenerateRequest(GenerationParameters):
    """Body of `POST /conversations/{id}/generate`, as the original service accepted it."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "What is the capital of France?",
                    "sample_len": 64,
                    "temperature": 0.0,
                    "top_p": 0.9,
                    "repeat_penalty": 1.1,
                    "repeat_last_n": 64,
                    "model": "SmolLM2-135M-Instruct",
                    "revision": "main",
                    "seed": 42,
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=100_000, description="The user's message.")


class RegenerateRequest(GenerationParameters):
    """Body of `POST /conversations/{id}/regenerate` (may be empty): answer the last prompt
    again, optionally with other parameters or another model."""


class StopResponse(BaseModel):
    id: int
    stopped: bool = Field(description="False when nothing was being generated in this conversation.")


class RenameRequest(RequestModel):
    """Body of `PATCH /conversations/{id}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"title": "Trip to Paris"}]})

    title: str = Field(min_length=1, max_length=200)


ExportFormat = Literal["json", "markdown"]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx of the original routes: `{"detail": "what went wrong and what to do"}`
    (422 validation errors carry FastAPI's list of field errors instead)."""

    detail: str | list[dict[str, Any]]


class ModelCard(BaseModel):
    name: str
    aliases: list[str]
    revision: str
    is_default: bool


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible API (`/v1`). Field names, defaults and response shapes follow OpenAI's API
# so the official SDK works unchanged; `top_k`, `repetition_penalty`, `min_tokens` and
# `ignore_eos` are the extensions vLLM users know; `conversation_id` is ours.
# ---------------------------------------------------------------------------------------------

OPENAI_DEFAULT_TEMPERATURE = 1.0
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # `n`: each choice takes a row of a model replica's batch

ModelState = Literal["loading", "ready", "failed"]
FinishReasonOut = Literal["stop", "length", "tool_calls"]


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement, each typed to accept only the values that ask for
# nothing (null, false, 0, empty): a client that relies on one gets a 400 naming it, not an
# answer silently without it. Fields that change nothing in the answer (`user`, `store`,
# `metadata`, ...) are ignored like any unknown field.
NOTHING_ASKED = "Not supported; only null or the value that asks for nothing is accepted."


def _refused_unless_nothing_asked(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("is not supported by this server; send null or leave it out") from None


_Nothing = TypeVar("_Nothing")
# The type of such a field: `Unsupported[<the values that ask for nothing>]`, null included.
Unsupported = Annotated[_Nothing | None, WrapValidator(_refused_unless_nothing_asked)]


EmptyList = Annotated[list[Any], Field(max_length=0)]


class TextResponseFormat(RequestModel):
    type: Literal["text"]


class JsonObjectFormat(RequestModel):
    """JSON mode: the answer is one JSON object."""

    type: Literal["json_object"]


# The names of schemas and tools, as OpenAI allows them.
OPENAI_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class JsonSchemaSpec(RequestModel):
    name: str = Field(pattern=OPENAI_NAME)
    description: str | None = None
    # `schema` would shadow pydantic's BaseModel.schema.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema", description="A JSON schema; none: any JSON.")
    strict: bool | None = Field(default=None, description="Accepted; every answer follows the schema either way.")


class JsonSchemaFormat(RequestModel):
    """Structured outputs: the answer is JSON that validates against the schema."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextResponseFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


def json_constraint(schema: dict[str, Any] | None, field: str) -> Constraint:
    """The constraint of a JSON schema (`None`: any JSON value), named by its request `field`."""
    # The schema's own key order is the order the answer's keys come in: not sorted.
    return Constraint(json_schema=json.dumps(schema if schema is not None else {}), field=field)


def format_constraint(fmt: TextResponseFormat | JsonObjectFormat | JsonSchemaFormat | None, field: str) -> Constraint | None:
    if isinstance(fmt, JsonObjectFormat):
        return json_constraint({"type": "object"}, field)
    if isinstance(fmt, JsonSchemaFormat):
        return json_constraint(fmt.json_schema.json_schema, field)
    return None


# logit_bias's keys: token ids in decimal without leading zeros, so no two keys name one token.
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,9})$"


class _OpenAISamplingRequest(RequestModel):
    """What chat and text completions share: the model, sampling and streaming options."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A served model name or alias (`GET /v1/models`).")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_SAMPLE_LEN)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Annotated[
        str | list[str] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(default=None, description=f"Up to {MAX_STOP_STRINGS} stop strings.")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices to generate for the prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="Lowers the logit of each token already in the answer once (0 = off)."
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="Lowers the logit of each token by this times its count in the answer."
    )
    user: str | None = None
    # vLLM-style extensions.
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K, description="-1 or 0 disables top-k.")
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, le=10.0, description="The original's repeat penalty over every token seen; 1 disables it."
    )
    min_tokens: int = Field(default=0, ge=0, le=MAX_SAMPLE_LEN)
    ignore_eos: bool = False
    logit_bias: (
        Annotated[
            dict[Annotated[str, StringConstraints(pattern=TOKEN_ID_KEY)], Annotated[float, Field(ge=-100.0, le=100.0)]],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = Field(
        default=None,
        description=f"Token id -> a value in [-100, 100] added to its logit; -100 bans the token. At most {MAX_LOGIT_BIAS}.",
    )

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _keys_are_token_ids(cls, value: Any) -> Any:
        for key in value if isinstance(value, dict) else ():
            if not re.fullmatch(TOKEN_ID_KEY, key):
                raise ValueError(f"key {key!r} is not a token id (decimal digits, no leading zeros)")
        return value

    @field_validator("stop")
    @classmethod
    def _few_non_empty_stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"takes at most {MAX_STOP_STRINGS} non-empty strings")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def _sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The request's `SamplingParams`; `max_tokens` None: the answer may run until the
        model's context ends (as OpenAI's, vLLM's and Ollama's), with the original API's
        default length kept free for it when a long chat is fitted to the context."""
        penalty = self.repetition_penalty or 1.0
        return SamplingParams(
            max_tokens=max_tokens or MAX_SAMPLE_LEN,
            reserve_tokens=None if max_tokens else DEFAULT_SAMPLE_LEN,
            temperature=OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=max(self.top_k or 0, 0),
            repeat_penalty=penalty,
            # vLLM's repetition_penalty looks at every token of prompt and answer.
            repeat_last_n=MAX_SAMPLE_LEN * 4 if penalty != 1.0 else 0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(token), value) for token, value in (self.logit_bias or {}).items()),
            seed=self.seed,
            stop=self.stop_strings,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            constraint=self.constraint(),
            logprobs=self.asked_logprobs(),
        )

    def asked_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs list (0: its own only); None: no logprobs."""
        return None

    def constraint(self) -> Constraint | None:
        """What the answer must match (structured outputs); None: free text."""
        return None

    def choices_params(self) -> list[SamplingParams]:
        """One `SamplingParams` per choice (`n`). A seeded request's choices draw under seed,
        seed + 1, ... (past MAX_SEED from 0 again, so each is a seed a request may send):
        distinct, and each as reproducible as the seed; unseeded ones each get a random seed
        from the engine."""
        params = self.to_sampling_params()
        if params.seed is None:
            return [params] * self.n
        return [dataclasses.replace(params, seed=(params.seed + i) % (MAX_SEED + 1)) for i in range(self.n)]

    def to_sampling_params(self) -> SamplingParams:
        raise NotImplementedError  # each request says its default length

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatContentPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=OPENAI_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments (an object).")
    strict: bool | None = Field(default=None, description="Accepted; a forced call's arguments follow the schema either way.")


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


def template_tools(tools: list[ToolDefinition]) -> list[dict[str, Any]]:
    """Tools as chat templates (and `serve_app.tool_calls`) take them."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


_Tool = TypeVar("_Tool")
_NamedChoice = TypeVar("_NamedChoice")
# The tool fields of chat completions and responses, each API with its own shapes.
Tools = Annotated[list[_Tool] | None, Field(max_length=128, description="Functions the model may call.")]
ToolChoice = Annotated[
    Literal["none", "auto", "required"] | _NamedChoice | None,
    Field(description='Default "auto" with tools. "required" or a named function: the answer is a call, its arguments valid.'),
]
ParallelToolCalls = Annotated[bool | None, Field(description="With tool_choice required: several calls at once (default true).")]


def check_tools(names: list[str], forced: bool, named: str | None, formatted: bool, format_field: str) -> None:
    """ValueError unless the tools and the tool_choice (`forced`: a call is asked for; `named`:
    the tool it names) fit together, and a forced call comes without a response format
    (`formatted`, in `format_field`)."""
    if len(set(names)) < len(names):
        raise ValueError("tools: two tools have the same name")
    if forced and not names:
        raise ValueError("tool_choice: asks for a call, but there are no tools")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice: names {named!r}, which is not among the tools")
    if forced and formatted:
        raise ValueError(f"{format_field}: cannot be combined with a forced tool call (tool_choice)")


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(RequestModel):
    name: str
    arguments: str  # JSON text of an object


class ToolCall(RequestModel):
    """A call the assistant made: in an answer, and sent back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(RequestModel):
    role: MessageRole | Literal["tool"]
    content: str | list[ChatContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool's result: the call it answers.")

    @model_validator(mode="after")
    def _has_what_its_role_needs(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant's message with tool_calls may have none)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant's message has them")
        for call in self.tool_calls or []:
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tool_calls: the arguments of {call.function.name} are not JSON: {exc}") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool_calls: the arguments of {call.function.name} must be a JSON object")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (a call's arguments as an object)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_OpenAISamplingRequest):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 64,
                    "temperature": 0,
                    "stream": True,
                }
            ]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_SAMPLE_LEN)
    logprobs: bool | None = Field(default=None, description="Each answer token's log-probability, from the model's logits.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: the most likely tokens' too.")
    tools: Tools[ToolDefinition] = None
    tool_choice: ToolChoice[NamedToolChoice] = None
    parallel_tool_calls: ParallelToolCalls = None
    # Not implemented (see NOTHING_ASKED).
    functions: Unsupported[EmptyList] = Field(default=None, description=NOTHING_ASKED)
    function_call: Unsupported[Literal["none", "auto"]] = Field(default=None, description=NOTHING_ASKED)
    response_format: ResponseFormat | None = Field(
        default=None, description="`json_object` or `json_schema`: decoding follows the JSON grammar, so the answer parses."
    )
    conversation_id: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CONVERSATION_ID,
        description=(
            "Ours: prepend this conversation's history, and store in it the last user message (or the tools' results"
            " that end `messages`) and the answer, its calls included."
        ),
    )

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_completion_tokens or self.max_tokens)

    def stored_parameters(self, model: str) -> dict[str, Any]:
        """The parameters recorded with the answer of a stored turn (`conversation_id`): the
        sampling fields the request sent, and the model."""
        stored = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}
        return self.model_dump(include=stored, exclude_none=True) | {"model": model}

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        formatted = self.response_format is not None and self.response_format.type != "text"
        check_tools([tool.function.name for tool in self.tools or []], self.calls_forced, named, formatted, "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.logprobs and self.tools and self.tool_choice != "none":
            raise ValueError("logprobs: not given with tools")
        return self

    def asked_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def constraint(self) -> Constraint | None:
        tools = self.tool_definitions
        if tools is not None and self.calls_forced:
            name = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
            return forced_constraint(tools, name, self.parallel_tool_calls is not False)
        return format_constraint(self.response_format, "response_format")

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    @property
    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools the prompt offers (none with tool_choice "none"), as templates take them."""
        if not self.tools or self.tool_choice == "none":
            return None
        return template_tools(self.tools)

    @property
    def calls_forced(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)


class TokenizeBody(RequestModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` (and `tools`) rendered with the model's
    chat template as a chat completion renders them."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}]},
    )

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = Field(
        default=None, description="Default: true for a prompt, false for messages, as a generation encodes each."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give either a prompt or messages")
        return self

    def request(self) -> TokenizeRequest:
        return TokenizeRequest(
            messages=None if self.messages is None else [m.template_message() for m in self.messages],
            prompt=self.prompt,
            tools=template_tools(self.tools) if self.tools else None,
            add_special_tokens=self.messages is None if self.add_special_tokens is None else self.add_special_tokens,
            add_generation_prompt=self.add_generation_prompt,
        )


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeBody(RequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_SAMPLE_LEN * 64)


class Detokenized(BaseModel):
    prompt: str


class CompletionRequest(_OpenAISamplingRequest):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "SmolLM2-135M-Instruct", "prompt": "Paris is", "max_tokens": 16}]},
    )

    # The schema states what `_one_prompt` accepts (the type alone would allow "" and batches).
    prompt: Annotated[
        str | list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                ]
            }
        ),
    ] = Field(description="One prompt (a list of exactly one string is accepted too).")
    # Not implemented (see NOTHING_ASKED).
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Each answer token's log-probability and this many most likely tokens'."
    )
    echo: bool = Field(
        default=False,
        description="The prompt before the answer, in `text` and, with `logprobs`, in `logprobs` too: each prompt "
        "token's log-probability (null for the first, which nothing predicts), as evaluation harnesses read them.",
    )
    best_of: Unsupported[Literal[1]] = Field(default=None, description=NOTHING_ASKED)
    suffix: Unsupported[Annotated[str, Field(max_length=0)]] = Field(default=None, description=NOTHING_ASKED)
    response_format: ResponseFormat | None = Field(
        default=None, description="Ours, as vLLM's: `json_object` or `json_schema`, as in chat completions."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("must be one string; batches of prompts are not supported")
        if not (value if isinstance(value, str) else value[0]):
            raise ValueError("must not be empty")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_sampling_params(self) -> SamplingParams:
        params = self._sampling_params(self.max_tokens or 16)  # OpenAI's default for completions
        return dataclasses.replace(params, prompt_logprobs=self.logprobs) if self.echo else params

    def asked_logprobs(self) -> int | None:
        return self.logprobs

    def constraint(self) -> Constraint | None:
        return format_constraint(self.response_format, "response_format")


class ResponseInputText(RequestModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer's, sent back
    text: str


class ResponseInputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponseInputText]

    def chat_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFunctionCall(RequestModel):
    """A call an earlier answer made (its `output` item), sent back in `input`."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text of an object
    id: str | None = None
    status: str | None = None

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, value: str) -> str:
        try:
            arguments = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ValueError("must be a JSON object")
        return value

    def tool_call(self) -> ToolCall:
        return ToolCall(id=self.call_id, function=ToolCallFunction(name=self.name, arguments=self.arguments))


class ResponseFunctionCallOutput(RequestModel):
    """A call's result, sent back in `input`."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ResponseFunctionTool(RequestModel):
    """The Responses API's function tool: chat completions' `function`, flat."""

    type: Literal["function"]
    name: str = Field(pattern=OPENAI_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments (an object).")
    strict: bool | None = Field(default=None, description="Accepted; a forced call's arguments follow the schema either way.")

    def chat_tool(self) -> ToolDefinition:
        function = FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )
        return ToolDefinition(type="function", function=function)


class ResponseNamedToolChoice(RequestModel):
    type: Literal["function"]
    name: str


def _input_item_kind(item: Any) -> str:
    """Which input item `item` is, by its `type` (a message's may be left out), so an invalid
    item's errors are those of its own kind, not of every kind it is not."""
    kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
    return kind if kind in ("function_call", "function_call_output") else "message"


ResponseInputItem = Annotated[
    Annotated[ResponseInputMessage, Tag("message")]
    | Annotated[ResponseFunctionCall, Tag("function_call")]
    | Annotated[ResponseFunctionCallOutput, Tag("function_call_output")],
    Discriminator(_input_item_kind),
]
# A prompt, or the items of a conversation; errors name which (`input.text`, `input.items.<i>`).
ResponseInput = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ResponseInputItem], Tag("items")],
    Discriminator(lambda value: "text" if isinstance(value, str) else "items"),
]


class ResponseJsonSchemaFormat(JsonSchemaSpec):
    """The Responses API's structured outputs: `json_schema`'s fields, flat."""

    type: Literal["json_schema"]


class ResponseTextOptions(RequestModel):
    format: Annotated[TextResponseFormat | JsonObjectFormat | ResponseJsonSchemaFormat, Field(discriminator="type")] | None = (
        Field(default=None, description="`json_object` or `json_schema`: decoding follows the JSON grammar.")
    )

    def constraint(self) -> Constraint | None:
        if isinstance(self.format, ResponseJsonSchemaFormat):
            return json_constraint(self.format.json_schema, "text.format")
        return format_constraint(self.format, "text.format")


class ResponsesRequest(_OpenAISamplingRequest):
    """OpenAI's Responses API: `input` (a string, or messages whose content is text, and the
    calls an answer made with their outputs) after optional `instructions`, with function
    `tools`; answered whole or as its stream of events.
    Responses are not stored (`store` is accepted and changes nothing), so neither
    `previous_response_id` nor `conversation` can continue one: send the earlier turns in `input`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "SmolLM2-135M-Instruct", "input": "What is the capital of France?", "max_output_tokens": 64}]
        },
    )

    input: ResponseInput = Field(
        description="The prompt, or the conversation so far: text messages, and the calls an answer made with their outputs."
    )
    instructions: str | None = Field(default=None, description="A system message before `input`.")
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_SAMPLE_LEN)
    store: bool | None = None
    text: ResponseTextOptions | None = None
    tools: Tools[ResponseFunctionTool] = None
    tool_choice: ToolChoice[ResponseNamedToolChoice] = None
    parallel_tool_calls: ParallelToolCalls = None
    include: list[Literal["message.output_text.logprobs"]] | None = Field(
        default=None, description="`message.output_text.logprobs`: each answer token's log-probability, from the model's logits."
    )
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: the most likely tokens' too.")
    # Not implemented (see NOTHING_ASKED).
    previous_response_id: Unsupported[None] = Field(default=None, description=NOTHING_ASKED)
    conversation: Unsupported[None] = Field(default=None, description=NOTHING_ASKED)
    reasoning: Unsupported[None] = Field(default=None, description=NOTHING_ASKED)
    background: Unsupported[Literal[False]] = Field(default=None, description=NOTHING_ASKED)
    n: Unsupported[Literal[1]] = Field(default=None, description=NOTHING_ASKED)  # type: ignore[assignment]
    prompt: Unsupported[None] = Field(default=None, description=NOTHING_ASKED)  # a stored prompt template

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ResponsesRequest:
        named = self.tool_choice.name if isinstance(self.tool_choice, ResponseNamedToolChoice) else None
        formatted = bool(self.text and self.text.format and self.text.format.type != "text")
        check_tools([tool.name for tool in self.tools or []], self.calls_forced, named, formatted, "text.format")
        if self.asked_logprobs() is not None and self.tool_definitions is not None:
            raise ValueError("include: logprobs are not given with tools")
        return self

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_output_tokens or self.max_tokens)

    def asked_logprobs(self) -> int | None:
        """As OpenAI's: logprobs when `include` asks for them, with `top_logprobs` alternatives."""
        return (self.top_logprobs or 0) if self.include and "message.output_text.logprobs" in self.include else None

    def constraint(self) -> Constraint | None:
        tools = self.tool_definitions
        if tools is not None and self.calls_forced:
            name = self.tool_choice.name if isinstance(self.tool_choice, ResponseNamedToolChoice) else None
            return forced_constraint(tools, name, self.parallel_tool_calls is not False)
        return self.text.constraint() if self.text else None

    @property
    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools the prompt offers (none with tool_choice "none"), as chat templates take them."""
        if not self.tools or self.tool_choice == "none":
            return None
        return template_tools([tool.chat_tool() for tool in self.tools])

    @property
    def calls_forced(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, ResponseNamedToolChoice)

    def chat_messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages: consecutive calls become one assistant
        message with `tool_calls`, a call's output a `tool` message."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        for item in [ResponseInputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input:
            if isinstance(item, ResponseInputMessage):
                messages.append(ChatMessage.model_validate(item.chat_message()))
            elif isinstance(item, ResponseFunctionCallOutput):
                messages.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
            elif messages and messages[-1].role == "assistant" and messages[-1].tool_calls:
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), item.tool_call()]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[item.tool_call()]))
        return [message.template_message() for message in messages]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallDelta(ToolCall):
    index: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text in UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat completions' logprobs of a choice's tokens (of a chunk's, streamed)."""

    content: list[ChatTokenLogprob]
    refusal: None = None

    @classmethod
    def of(cls, entries: list) -> ChoiceLogprobs:
        """From the engine's entries (`deployments.engine.protocol.TokenLogprob`)."""

        def top(text: str, logprob: float) -> TopLogprob:
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return cls(
            content=[
                ChatTokenLogprob(**top(text, logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in alternatives])
                for text, logprob, alternatives in entries
            ]
        )


class CompletionLogprobs(BaseModel):
    """Completions' (legacy) logprobs: per token its text, log-probability, most likely tokens
    and where its text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: a prompt's first token (`echo`)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list, offset: int = 0) -> CompletionLogprobs:
        """From the engine's entries; `offset`: where the first token's text starts."""
        offsets = []
        for text, _, _ in entries:
            offsets.append(offset)
            offset += len(text)
        return cls(
            tokens=[text for text, _, _ in entries],
            token_logprobs=[logprob for _, logprob, _ in entries],
            top_logprobs=[None if alternatives is None else dict(alternatives) for _, _, alternatives in entries],
            text_offset=offsets,
        )


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReasonOut | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReasonOut | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonOut | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion, or (with `usage` None until the end) one streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[ChatTokenLogprob] = []  # with `include` message.output_text.logprobs


MessageStatusOut = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = MessageStatusOut | Literal["failed"]


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: MessageStatusOut
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseOutputFunctionCall(BaseModel):
    """A call the answer makes: its `arguments` validate against the tool's parameters when the
    call was forced (`tool_choice`)."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: MessageStatusOut = "completed"


ResponseOutputItem = ResponseOutputMessage | ResponseOutputFunctionCall


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = {"cached_tokens": 0}
    output_tokens: int
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}
    total_tokens: int


class ResponseIncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A response of the Responses API; also the `response` of its stream's lifecycle events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: ResponseIncompleteDetails | None = None
    instructions: str | None = None
    model: str
    output: list[ResponseOutputItem]
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice = "auto"
    tools: list[ResponseFunctionTool] = []
    previous_response_id: None = None
    store: bool = False  # never stored here
    text: dict[str, Any] = {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] = {}
    usage: ResponseUsage | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ray-chat"
    # Ours: whether the model's deployment can serve now.
    state: ModelState
    aliases: list[str] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class UsageEntry(UserUsage):
    limits: Limits  # the user's limits now (`quotas` in the settings); null: unlimited


class UsageReport(BaseModel):
    """`GET /v1/usage`: the caller's usage today (UTC), or with `?all=true` every user's (admins)."""

    object: Literal["list"] = "list"
    data: list[UsageEntry]
