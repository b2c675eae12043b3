"""Helpers of the engine's tests (fixtures are in conftest.py)."""

from __future__ import annotations

import pytest

from deployments.model_loader import LoadedModel

# Each decode step run and read before the next (the CPU's default), or queued before the last
# one is read (`overlap_steps`, a GPU's default): every engine test runs both ways on the CPU.
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])


def prompt(tiny: LoadedModel, text: str) -> list[int]:
    return tiny.tokenizer(text, add_special_tokens=False)["input_ids"]


async def run(engine, prompt_ids, params):
    outputs = [o async for o in engine.generate(prompt_ids, params)]
    return "".join(o.text for o in outputs), outputs
