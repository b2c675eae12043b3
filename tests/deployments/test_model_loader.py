from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from deployments import model_loader
from deployments.model_loader import ModelLoadError, ensure_cached, load_model, pick_device
from deployments.model_registry import ModelConfig


def test_auto_device_is_the_cpu_without_accelerators():
    assert torch.cuda.is_available() or pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_device_fails_clearly():
    with pytest.raises(ModelLoadError, match="device 'cuda' was requested but torch sees no CUDA GPU"):
        pick_device("cuda")


def _write_marker(tmp: Path) -> None:
    (tmp / "weights.bin").write_text("converted")


def test_ensure_cached_builds_once_then_reuses(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        _write_marker(tmp)

    target = tmp_path / "model"
    assert ensure_cached(target, build) == target
    assert ensure_cached(target, build) == target
    assert len(calls) == 1
    assert (target / "weights.bin").read_text() == "converted"


def test_an_interrupted_build_leaves_no_cache_behind(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_text("partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C during conversion

    with pytest.raises(KeyboardInterrupt):
        ensure_cached(tmp_path / "model", build)
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def _slow_build_counting(target: str, counter: str) -> None:
    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        _write_marker(tmp)

    ensure_cached(Path(target), build)


def test_two_processes_starting_together_convert_once(tmp_path):
    target, counter = tmp_path / "model", tmp_path / "counter"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_build_counting, args=(str(target), str(counter))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "built\n"
    assert (target / "weights.bin").is_file()


def test_unreachable_hub_model_fails_fast_naming_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    # Point the Hub at a port where nothing listens: refused at once, offline or not.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    config = ModelConfig(name="Qwen2.5-0.5B-Instruct", source={"kind": "hf", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct"})
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"model 'Qwen2.5-0.5B-Instruct': cannot download 'Qwen/Qwen2.5-0.5B-Instruct'"):
        load_model(config, tmp_path)
    assert time.monotonic() - started < 10


def test_missing_local_dir_fails_clearly(tmp_path):
    config = ModelConfig(name="mine", source={"kind": "local", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelLoadError, match="model 'mine': directory .*nope does not exist"):
        load_model(config)


def test_tiny_model_round_trips_through_a_local_directory(tmp_path):
    tiny = load_model(ModelConfig(name="tiny", source={"kind": "tiny_random", "seed": 7}))
    assert tiny.context_length == 512
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = load_model(ModelConfig(name="mine", source={"kind": "local", "path": str(tmp_path)}, context_length=100))
    assert local.context_length == 100
    ids = torch.tensor([tiny.tokenizer("héllo 😀").input_ids])
    with torch.inference_mode():
        assert torch.equal(tiny.model(ids).logits, local.model(ids).logits)
    assert local.tokenizer.decode(ids[0]) == "héllo 😀"


@pytest.mark.slow
def test_packaged_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    config = ModelConfig(name="SmolLM2-135M-Instruct")
    first = load_model(config, tmp_path)
    (cached,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (cached / "model.safetensors").stat().st_size > 400_000_000  # fp32 weights

    def no_conversion(*args):
        raise AssertionError("the second load must reuse the cache")

    monkeypatch.setattr(model_loader, "_convert_gguf", no_conversion)
    started = time.monotonic()
    second = load_model(config, tmp_path)
    assert time.monotonic() - started < 15
    ids = torch.tensor([first.tokenizer("The capital of France is").input_ids])
    with torch.inference_mode():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
