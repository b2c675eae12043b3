"""What one model replica does, without Ray: load the model, turn a conversation into prompt
tokens with the model's chat template (dropping the oldest turns that do not fit the context),
and stream the engine's output.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import logging
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch

from deployments.engine.batched import BatchedEngine
from deployments.engine.protocol import (
    Engine,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    TokenizeRequest,
)
from deployments.engine.quantized import cpu_has_fast_int8
from deployments.engine.reference import ReferenceEngine
from deployments.engine.sampling_params import SamplingParams
from deployments.engine.torch_threads import run_in_fresh_thread
from deployments.model_loader import LoadedModel, load_model
from deployments.model_registry import ModelConfig
from deployments.tool_prompt import template_knows_tools, with_tools_in_text

logger = logging.getLogger(__name__)

# Prompts up to this long are tokenized on the event loop: that costs about what the hop to the
# encoder thread and back would, and every request pays the hop (docs/performance.md).
INLINE_ENCODE_CHARS = 2_000


class LLMServer:
    def __init__(self, config: ModelConfig, cache_dir: Path | None = None, loaded: LoadedModel | None = None):
        self.config = config
        # In a thread that exits, so the engine's thread is left the only one with an OpenMP pool.
        self.loaded = loaded or run_in_fresh_thread(load_model, config, cache_dir)
        torch.set_num_threads(config.torch_threads or max(1, round(config.num_cpus)))
        self.engine: Engine
        if config.engine == "batched":
            stream_chunks_per_s, replica_chunks_per_s = config.resolved_chunks_per_s(self.loaded.device.type)
            self.engine = BatchedEngine(
                self.loaded,
                weights=config.resolved_weights(self.loaded.device.type, cpu_has_fast_int8()),
                max_batch_size=config.max_batch_size,
                max_chunks_per_s=replica_chunks_per_s,
                max_stream_chunks_per_s=stream_chunks_per_s,
                cuda_graphs=config.cuda_graphs,
                gpu_memory_fraction=config.gpu_memory_fraction,
                prefill_chunk_tokens=config.prefill_chunk_tokens,
                newcomers_first=config.newcomers_first,
            )
            # The engine keeps its own copy of the weights; transformers' (SmolLM2 fp32: 0.5 GB) can go.
            self.loaded = dataclasses.replace(self.loaded, model=None)
        else:
            self.engine = ReferenceEngine(self.loaded)
        self._stop_requested: dict[str, asyncio.Event] = {}
        # Long prompts are tokenized off the replica's event loop, which takes every other
        # request: templating and tokenizing a long one on the loop would stall every other
        # stream (docs/performance.md). One worker: a fast tokenizer must not be entered from two
        # threads at once, so short ones are tokenized on the loop only while it has none (`_encoding`).
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-prompt")
        self._encoding = 0
        self._warm_up()
        self._warm_up_requests = self.engine.stats().total_requests  # left out of `stats`

    def _warm_up(self) -> None:
        """One short answer before the replica takes requests. The first answer otherwise pays
        one-time work (the chat template's compilation, the engine's first steps and kernel
        calls), which made it several times slower than the next ones (docs/engine.md#warm-up)."""
        hello = "Hello"
        chat = [{"role": "user", "content": hello}] if self.loaded.tokenizer.chat_template else None
        request = GenerationRequest(messages=chat, prompt=None if chat else hello, params=SamplingParams(max_tokens=2))

        async def answer() -> None:
            async with aclosing(self.generate(request)) as outputs:
                async for _ in outputs:
                    pass

        try:
            run_in_fresh_thread(asyncio.run, answer())
        except InvalidRequestError as exc:  # a context too short for it: the first answer pays
            logger.info("%s: no warm-up answer (%s)", self.config.name, exc)

    def encode_chat(
        self, messages: list[dict[str, Any]], max_tokens: int, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of `messages` (and `tools`, see `tool_prompt`) under the chat template,
        leaving `max_tokens` of room for the answer. Whole turns are dropped from the oldest end
        (a leading system message is kept) until the prompt fits; if even the last message alone
        does not fit, that is an error."""
        tokenizer, budget = self.loaded.tokenizer, self.loaded.context_length - max_tokens
        messages, template_tools = self._template_inputs(messages, tools)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system) :]

        def encode(start: int) -> list[int]:
            text = tokenizer.apply_chat_template(
                system + turns[start:], tools=template_tools, add_generation_prompt=True, tokenize=False
            )
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        # Where the kept turns may start: the first message or a later user message (a turn is a
        # user message and the answers that follow it).
        starts = [0] + [i for i, m in enumerate(turns) if i and m["role"] == "user"]
        # A template gives every message a token at least, so starts that keep more messages than
        # the budget cannot fit and are never rendered; among the others the prompt shrinks as the
        # start moves on, so a binary search finds the earliest that fits. Dropping one turn per
        # render took minutes for a body of 100,000 one-word messages, with the replica's loop blocked.
        low, high, fitting = bisect.bisect_left(starts, len(turns) - budget), len(starts) - 1, None
        while low <= high:
            middle = (low + high) // 2
            ids = encode(starts[middle])
            if len(ids) <= budget:
                fitting, high = ids, middle - 1
            else:
                low = middle + 1
        if fitting is None:
            raise PromptTooLongError.of(len(encode(starts[-1])), self.loaded.context_length, max_tokens, self._whose)
        return fitting

    def _template_inputs(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], list[dict | Callable] | None]:
        """The messages and tools to render: as given for a template that reads tools, else the
        tools, calls and results written into the messages (`tool_prompt`)."""
        has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if (tools or has_tool_turns) and not template_knows_tools(self.loaded.tokenizer.chat_template):
            return with_tools_in_text(messages, tools or []), None
        return messages, list(tools) if tools else None  # transformers' type: schemas or functions

    def tokenize(self, request: TokenizeRequest) -> tuple[list[int], int]:
        """The token ids of `request`'s text, rendered as a generation renders it (the whole
        conversation: none of it dropped to fit the context), and the model's context length."""
        tokenizer = self.loaded.tokenizer
        text: Any = request.prompt or ""  # transformers types the template's text as any of its outputs
        if request.messages is not None:
            messages, tools = self._template_inputs(request.messages, request.tools)
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=request.add_generation_prompt, tokenize=False
            )
        return tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"], self.loaded.context_length

    def detokenize(self, tokens: list[int]) -> str:
        vocabulary = len(self.loaded.tokenizer)
        beyond = [token for token in tokens if not 0 <= token < vocabulary]
        if beyond:
            raise InvalidRequestError(f"tokens: {beyond[0]} is not among the model's {vocabulary} token ids")
        # transformers types `decode` as str | list[str]: a list only for a batch of sequences.
        return self.loaded.tokenizer.decode(tokens)  # type: ignore[return-value]

    def encode_prompt(self, prompt: str, max_tokens: int) -> list[int]:
        ids = self.loaded.tokenizer(prompt)["input_ids"]
        if len(ids) > self.loaded.context_length - max_tokens:
            raise PromptTooLongError.of(len(ids), self.loaded.context_length, max_tokens, self._whose)
        return ids

    @property
    def _whose(self) -> str:
        return f"model '{self.config.name}'"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        """The engine's outputs; a `cancel(request_id)` ends the stream after the current decode
        step with a last output whose finish reason is "cancelled"."""
        if request.messages is not None:
            encode = functools.partial(self.encode_chat, request.messages, request.params.answer_room, request.tools)
            chars = sum(len(message.get("content") or "") for message in request.messages)
        else:
            encode = functools.partial(self.encode_prompt, request.prompt or "", request.params.answer_room)
            chars = len(request.prompt or "")
        if chars <= INLINE_ENCODE_CHARS and not self._encoding:
            prompt_ids = encode()
        else:
            self._encoding += 1
            try:
                prompt_ids = await asyncio.get_running_loop().run_in_executor(self._encoder, encode)
            finally:
                self._encoding -= 1
        stop = asyncio.Event()
        if request.request_id is not None:
            self._stop_requested[request.request_id] = stop
        try:
            async with aclosing(self.engine.generate(prompt_ids, request.params)) as outputs:
                async for output in outputs:
                    yield output
                    if stop.is_set() and output.finish_reason is None:
                        yield GenerationOutput("", output.prompt_tokens, output.completion_tokens, "cancelled")
                        return
        finally:
            if request.request_id is not None:
                self._stop_requested.pop(request.request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Asks the request to stop; False if no such request runs on this replica."""
        stop = self._stop_requested.get(request_id)
        if stop is not None:
            stop.set()
        return stop is not None

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        return dataclasses.replace(stats, total_requests=stats.total_requests - self._warm_up_requests)
