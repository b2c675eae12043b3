"""Grammar-constrained decoding: a request's `Constraint` (a JSON schema, or a Lark grammar)
becomes an llguidance matcher, which after every token says which tokens may come next; the
engine masks every other token's logit before it samples.

llguidance over xgrammar: it fills a step's masks and compiles a schema in less host time
(`bench/grammar_bench.py`; figures in docs/openai.md). On a CPU the host is the device, so the
masks' time is the engine's.

Compiled grammars are kept per constraint (`Grammars`, least recently used out); a request
starts from a copy of its grammar's fresh matcher (a copy costs a small fraction of a compile).
Owns: compiling and checking constraints, filling masks, applying them to logits.
Does not own: which rows run a step (see `batched`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from deployments.engine.protocol import InvalidRequestError
from deployments.engine.sampling_params import Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compiled constraints a replica keeps: a grammar is a few hundred KB at most.
CACHE_SIZE = 256
# Whitespace between JSON's tokens as a model writes it: at most one line break and an indent.
# The packaged 135M model writes JSON with newlines and indents; without them it went off its
# course (sampled at 0.8, asked for France's capital and population in JSON mode: 9 of 12
# answers closed without whitespace, 21 of 24 with it). Unbounded, a model fond of whitespace
# writes it until max_tokens (the tiny random model did). A schema's "x-guidance" overrides it.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": True, "whitespace_pattern": r"(\r?\n)?[ \t]{0,24}"}


def _grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for `constraint`; InvalidRequestError naming its field if the JSON
    schema is not JSON or not an object."""
    if constraint.lark is not None:
        return llguidance.LLMatcher.grammar_from_lark(constraint.lark)
    try:
        schema = json.loads(constraint.json_schema or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{constraint.field}: the schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{constraint.field}: the schema must be a JSON object, not {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:  # e.g. a NaN in it, which Python's JSON reads but JSON is without
        raise InvalidRequestError(f"{constraint.field}: {exc}") from None


class Grammars:
    """The constraints of one model's tokenizer: compiles each once, checks it, and hands each
    request a matcher of its own."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        # The matcher allows an EOS once the grammar is complete: any of the model's EOS tokens.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
        self._compiled: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()

    def is_compiled(self, constraint: Constraint) -> bool:
        return constraint in self._compiled

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for `constraint`. InvalidRequestError, naming the constraint's field
        and saying what is wrong, when the grammar cannot be compiled (an unsupported or
        contradictory schema). Compiling drops the GIL: a caller may run it in a thread."""
        fresh = self._compiled.get(constraint)
        if fresh is None:
            fresh = llguidance.LLMatcher(self._tokenizer, _grammar_text(constraint), log_level=0)
            if fresh.is_error():
                raise InvalidRequestError(f"{constraint.field}: {fresh.get_error()}")
            self._compiled[constraint] = fresh
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(constraint)
        return fresh.deep_copy()


class Masks:
    """A step's masks for its constrained rows: one int32 bitmask row (bit t of word t // 32:
    token t allowed) per constrained row, filled by llguidance on the host."""

    def __init__(self, vocab_size: int, rows: int, parallel: bool = True):
        self._bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab_size)
        # llguidance's own threads fill several rows at once; where the host's cores run the
        # model too (a CPU), one thread beside the pass is faster: its pool fought torch's.
        self._executor = llguidance.LLExecutor() if parallel else None
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    def start_fill(self, matchers: list[llguidance.LLMatcher]) -> Future[torch.Tensor]:
        """`fill` on a thread of its own, while the caller runs the step's forward pass."""
        return self._filler.submit(self.fill, matchers)

    def fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), words] int32: each matcher's allowed next tokens, off the GIL
        (several rows at once on llguidance's threads where `parallel`)."""
        bitmask = self._bitmask[: len(matchers)]
        if len(matchers) == 1 or self._executor is None:
            for row, matcher in enumerate(matchers):
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        else:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """In place on logits [B, vocab]: every token a row's bitmask does not allow gets -inf
        (on a CPU the dtype's lowest value, which no sampling can pick either). Only the
        constrained `rows` are read and written, so a step's other rows pay nothing."""
        vocab = logits.shape[1]
        index = torch.tensor(rows, device=logits.device)
        if logits.device.type == "cpu":
            # numpy unpacks the bits in one C loop, and adding a float mask is vectorized where
            # torch's masked_fill over a bool mask is not: 0.2 ms for 8 rows of SmolLM2's
            # vocabulary against 1.2 (docs/openai.md).
            refused = np.unpackbits(np.invert(bitmask.numpy().view(np.uint8)), axis=1, count=vocab, bitorder="little")
            penalty = torch.from_numpy(refused).to(logits.dtype).mul_(torch.finfo(logits.dtype).min)
            logits.index_add_(0, index, penalty)
            return
        bitmask = bitmask.to(logits.device, non_blocking=True)
        allowed = ((bitmask[:, :, None] >> self._shifts.to(logits.device)) & 1).view(len(rows), -1)[:, :vocab]
        logits[index] = logits[index].masked_fill(allowed == 0, -torch.inf)
