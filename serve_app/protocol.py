"""The wire protocol: every HTTP request and response body, with ranges and defaults on the
fields, so validation, defaults and the OpenAPI docs come from one place.

Requests convert themselves into the engine's `SamplingParams` once (`to_sampling_params`).
The history records are defined here too, because they are what `GET /conversations/{id}`
returns; the history store produces them directly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.sampling import SamplingParams

# Defaults of the original API, shared by every route that samples.
DEFAULT_SAMPLE_LEN = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_REPEAT_PENALTY = 1.1
DEFAULT_REPEAT_LAST_N = 64
MAX_SAMPLE_LEN = 8192
MAX_SEED = 2**63 - 1

MessageRole = Literal["system", "user", "assistant"]
# complete: the answer ended normally; stopped: the client went away or pressed stop, the
# partial answer is kept; failed: generation raised, `error` says why.
MessageStatus = Literal["complete", "stopped", "failed"]


class GenerateRequest(BaseModel):
    """Body of `POST /conversations/{id}/generate`, as the original service accepted it.

    Every field but `prompt` may be omitted or null and then takes its default. Unknown fields
    are ignored so that old clients keep working."""

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
    sample_len: int | None = Field(
        default=None, ge=1, le=MAX_SAMPLE_LEN, description=f"Most tokens to generate (default {DEFAULT_SAMPLE_LEN})."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, le=5.0, description=f"0 is greedy (default {DEFAULT_TEMPERATURE})."
    )
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


class Message(BaseModel):
    id: int
    role: MessageRole
    content: str
    model: str | None = None
    parameters: dict[str, Any] | None = None
    status: MessageStatus = "complete"
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: datetime


class ConversationSummary(BaseModel):
    id: int
    title: str | None = None
    created_at: datetime
    updated_at: datetime


class Conversation(ConversationSummary):
    messages: list[Message] = []


class RenameRequest(BaseModel):
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
