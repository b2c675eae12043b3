"""A request inside the batched engine (`Sequence`) and the hand-over of its outputs to the
asyncio side (`Posts`).

Owns: a request's state as the scheduler, the model runner and the output stage share it.
Does not own deciding what runs (`scheduler`), running it (`model_runner`) or turning ids into
text (`outputs`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import llguidance

from deployments.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from deployments.engine.protocol import GenerationOutput, TokenLogprob
from deployments.engine.sampler import SlotEntry
from deployments.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Written by the engine thread only, except
    `is_cancelled`, which the request's async generator sets."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    posts: Posts  # the engine's, through which `send` hands over outputs
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    sampling: SlotEntry  # its row of the sampler's table, written when it gets a slot
    matcher: llguidance.LLMatcher | None = None  # its constraint's state (see `grammar`)
    slot: int = -1
    n_prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    is_cancelled: bool = False
    unsent_text: str = ""  # held back to coalesce chunks, see `outputs.OutputStage`
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last output
    prompt_pieces: list[str] = field(default_factory=list)  # each prompt token's text, if its logprobs are asked
    last_sent: float = -math.inf  # time.monotonic() of the last output sent

    @property
    def steps_alone(self) -> bool:
        """Whether each of its steps must be read before the next is queued, and run eagerly:
        its grammar's mask needs its last token on the host; its logprobs, the step's logits."""
        return self.matcher is not None or self.params.logprobs is not None

    @property
    def scores_prompt(self) -> bool:
        """Whether its prompt's tokens' logprobs are asked (`SamplingParams.prompt_logprobs`)."""
        return self.params.prompt_logprobs is not None

    @property
    def is_prefilled(self) -> bool:
        return self.n_prefilled == len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    def cached_ids(self) -> list[int]:
        """The tokens whose K/V are in the cache row, at positions 0, 1, ...: the prefilled
        prompt and every generated token but the newest (it is written by the next step)."""
        return (self.prompt_ids + self.generated)[: self.n_prefilled + max(0, len(self.generated) - 1)]

    def is_at_limit(self, max_context: int, pending: int = 0) -> bool:
        """Whether, with `pending` more tokens than it has, it is at max_tokens or the context."""
        return len(self.generated) + pending >= self.params.max_tokens or self.length + pending >= max_context

    def send(self, item: GenerationOutput | BaseException) -> None:
        """Hands `item` to the request: at the end of the engine's step (`Posts.deliver`)."""
        self.posts.add(self, item)


class Posts:
    """What the engine thread has for the requests during one step, handed to their event loops
    after it in one call per loop: each `call_soon_threadsafe` wakes the loop with a write to its
    self-pipe, and the loop then runs every request's hand-over in one turn."""

    def __init__(self) -> None:
        self._items: list[tuple[Sequence, GenerationOutput | BaseException]] = []

    def add(self, seq: Sequence, item: GenerationOutput | BaseException) -> None:
        self._items.append((seq, item))

    def deliver(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationOutput | BaseException]]] = {}
        for seq, item in self._items:
            by_loop.setdefault(seq.loop, []).append((seq.outputs, item))
        self._items = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
