"""Fixtures shared by the engine's CPU and GPU tests."""

from __future__ import annotations

import pytest

from deployments.engine.batched import BatchedEngine


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
