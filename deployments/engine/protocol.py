"""The contract between the model deployment and whatever runs the model, and the messages that
cross Ray between the ingress and a model replica. Torch-free on purpose: the ingress and the
application builder import this module and never load torch.

An engine takes prompt token ids and `SamplingParams` and yields `GenerationOutput`s: the new
text since the previous output, at most one per decode step, the last with a finish reason.
Closing the async generator (`aclose()`: client gone, stop button) cancels the request at the next step.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from deployments.engine.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


# A generated token's log-probability (`SamplingParams.logprobs`): its text (what it added to the
# answer, so the texts join into it), its log-probability, and the most likely tokens' (text,
# log-probability), most likely first. Lists, not tuples: they cross to the ingress as JSON. A
# prompt's first token (`SamplingParams.prompt_logprobs`) has None for both: nothing predicts it.
TokenLogprob = list  # [str, float | None, list[[str, float]] | None]


@dataclass
class GenerationOutput:
    text: str  # new text since the previous output
    prompt_tokens: int
    completion_tokens: int  # generated so far
    finish_reason: FinishReason | None = None  # set on the last output only
    logprobs: list[TokenLogprob] | None = None  # of the tokens generated since the previous output, if asked


@dataclass
class EngineStats:
    active_requests: int
    queued_requests: int
    total_requests: int
    reused_prompt_tokens: int = 0  # taken from the prefix cache instead of computed, since start


class Engine(Protocol):
    def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationOutput, None]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class ReplyTo:
    """Where a request's outputs before its last go: an ingress replica's inbox and the
    request's stream in it (`deployments.output_channel`)."""

    host: str
    port: int
    secret: str
    stream: int


@dataclass(frozen=True)
class Delivered:
    """What a model replica's unary call returns: the request's last output (the one with a
    finish reason), after `sent` outputs went to its `ReplyTo`."""

    last: GenerationOutput
    sent: int


@dataclass
class GenerationRequest:
    """What the ingress sends a model replica: either chat `messages` (earlier turns and the new
    prompt, rendered with the model's chat template) or a raw `prompt` (text completion)."""

    # [{"role": ..., "content": ...}], oldest first; an assistant's may have OpenAI's "tool_calls"
    # (arguments as objects), a "tool" message a "tool_call_id".
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool definitions, for the chat template
    params: SamplingParams = field(default_factory=SamplingParams)
    # Lets `cancel(request_id)` stop it from anywhere (e.g. a stop button on another connection).
    request_id: str | None = None
    # Requests with the same key go to the same replica while it has room, where the prefix
    # cache holds what they share (`deployments.affinity_router`); None: any replica.
    affinity_key: str | None = None
    # Where its outputs before the last go (the ingress sets it); the handle call returns the last.
    reply_to: ReplyTo | None = None


@dataclass
class TokenizeRequest:
    """Text to count in tokens as a generation would: chat `messages` (and `tools`) under the
    chat template, or a raw `prompt` (vLLM's /tokenize)."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class InvalidRequestError(ValueError):
    """A request that cannot run as asked (an empty prompt, a parameter the engine cannot
    represent, a conversation with nothing to answer): the caller's fault, answered 400."""


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """InvalidRequestError if `params` bias a token beyond the model's `vocab_size` logits (on a
    GPU such an index would not fail the one request but the device's whole context)."""
    beyond = [token for token, _ in params.logit_bias if not 0 <= token < vocab_size]
    if beyond:
        raise InvalidRequestError(f"logit_bias: token id {beyond[0]} is not among the model's {vocab_size} token ids")


def check_constraint(params: SamplingParams) -> None:
    """InvalidRequestError if `params` constrain the answer (`constraint`) and also ask for
    what a constraint cannot allow: min_tokens (once the grammar is complete only EOS may
    follow, and min_tokens would forbid it)."""
    if params.constraint is not None and params.min_tokens:
        raise InvalidRequestError(f"min_tokens: cannot be combined with {params.constraint.field}")


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus room for the answer) does not fit the model's context."""

    @classmethod
    def of(cls, prompt_tokens: int, context: int, reserved: int, model: str) -> PromptTooLongError:
        """A prompt of `prompt_tokens` that leaves less than `reserved` of `model`'s `context`."""
        return cls(
            f"the prompt is {prompt_tokens} tokens but {model} has a context of {context} tokens and {reserved} "
            "are reserved for the answer (sample_len / max_tokens); shorten the prompt or ask for fewer tokens"
        )
