"""Fixtures shared by the engine's CPU and GPU tests."""

from __future__ import annotations

import math

import pytest
import torch

from deployments.engine.batched import BatchedEngine
from deployments.model_loader import LoadedModel, build_tiny_random_model
from deployments.model_registry import ModelConfig


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_random_model()
    return LoadedModel(
        ModelConfig(name="tiny", source={"kind": "tiny_random"}), model.eval(), tokenizer, torch.device("cpu"), 512
    )


@pytest.fixture(params=[False, True], ids=["step-by-step", "overlapped"])
def engine(tiny, request):
    """The CPU's scheduling (steps run one by one, newcomers' prompts first) and the GPU's
    (overlapped, prompts with the decode rows); every token its own output (no coalescing), so
    tests can act between tokens."""
    engine = BatchedEngine(
        tiny,
        max_batch_size=8,
        max_context=256,
        prefill_chunk_tokens=16,
        max_chunks_per_s=math.inf,
        max_stream_chunks_per_s=math.inf,
        overlap_steps=request.param,
        newcomers_first=not request.param,
    )
    yield engine
    engine.shutdown()


@pytest.fixture
def redone_rows(monkeypatch) -> list[int]:
    """After each overlapped step a `BatchedEngine` reads, how many rows of the step queued
    after it were fed a drafted id that the whole-vocabulary sort then changed (and so are
    decoded again)."""
    counts: list[int] = []
    complete = BatchedEngine._complete

    def counting_complete(self, launched):
        complete(self, launched)
        if self._launched is not None:
            counts.append(len(self._launched.stale))

    monkeypatch.setattr(BatchedEngine, "_complete", counting_complete)
    return counts
