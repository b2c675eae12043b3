"""Helpers of the engine's tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import pydantic
import pytest
import torch

from deployments.engine.sampler import SlotSampling
from deployments.engine.sampling_params import Constraint, SamplingParams
from deployments.model_loader import LoadedModel

# Each decode step run and read before the next (the CPU's default), or queued before the last
# one is read (`overlap_steps`, a GPU's default): every engine test runs both ways on the CPU.
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])


def prompt(tiny: LoadedModel, text: str) -> list[int]:
    return tiny.tokenizer(text, add_special_tokens=False)["input_ids"]


async def run(engine, prompt_ids, params):
    outputs = [o async for o in engine.generate(prompt_ids, params)]
    return "".join(o.text for o in outputs), outputs


class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false


class Place(Strict):
    city: str = pydantic.Field(max_length=8)


class Record(Strict):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "editor", "viewer"]
    active: bool
    place: Place
    tags: list[Annotated[str, pydantic.Field(max_length=8)]] = pydantic.Field(max_length=3)


# Every string and list bounded, so every answer ends within max_tokens; and no whitespace (the
# schema's own llguidance options): a random model takes every gap the grammar allows, one byte a
# token, which would not fit the tiny model's context.
def no_whitespace(schema: dict) -> Constraint:
    return Constraint(
        json_schema=json.dumps({**schema, "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None}})
    )


RECORD = no_whitespace(Record.model_json_schema())


# Three requests' settings, each exercising other columns of the sampler's table.
MIXED = [
    SamplingParams(temperature=0.7, top_p=0.9, repeat_penalty=1.1, repeat_last_n=64),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_k=40, min_tokens=3, logit_bias=((3, -100.0), (299, 2.5))),
]


def written_together(device: torch.device) -> SlotSampling:
    """A table with three requests admitted in one step (rows 4, 0, 2; row 1 and 3 empty)."""
    table = SlotSampling.empty(5, 300, device)
    table.write([table.entry(slot, p, 2**63 + slot, 10 * slot + 1) for slot, p in zip([4, 0, 2], MIXED)])
    return table
