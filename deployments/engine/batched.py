"""The continuous-batching engine: every running request advances by one token per step, in
one forward pass over the weights, and requests join and leave between steps.

One loop runs in its own thread (`_run`); each step reads plan -> run -> emit: the `Scheduler`
admits waiting requests into free cache rows and plans the step (a token for each decoding
request, chunks of newcomers' prompts, prefixes copied from other rows), the `ModelRunner`
runs it on the device, and the `OutputStage` turns the ids into each request's text, which
reaches the request's asyncio queue at the end of the step (`sequence.Posts`). The caller's
event loop never runs torch.

On a GPU, while every request is decoding, each step is queued before the last one's ids are
read (`overlap_steps`): the device computes step t+1 while the host streams step t's text, and
a row reads its input id from step t's draft on the device (`_launch_decode`, `_complete`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import llguidance
import torch

from deployments.engine.cuda_graphs import DecodeRow
from deployments.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from deployments.engine.grammar import Grammars
from deployments.engine.model_runner import ConstrainedRows, CudaModelRunner, ModelRunner, ScoredRows, Step
from deployments.engine.outputs import OutputStage, TokenLogprobs
from deployments.engine.protocol import (
    EngineStats,
    GenerationOutput,
    InvalidRequestError,
    PromptTooLongError,
    check_constraint,
    check_logit_bias,
)
from deployments.engine.sampler import Draft, Fetch, Needs, SlotSampling, finish
from deployments.engine.sampling_params import SamplingParams
from deployments.engine.scheduler import Scheduler, StepPlan
from deployments.engine.sequence import Posts, Sequence
from deployments.model_loader import LoadedModel, eos_token_ids
from deployments.model_registry import WeightFormat

logger = logging.getLogger(__name__)


class EngineShutDownError(RuntimeError):
    """The engine stopped while the request was waiting or running."""


@dataclass(eq=False)
class _Launched:
    """A decode step queued on the device whose ids the host has not read yet (see `_step`)."""

    seqs: list[Sequence]  # by row
    positions: list[int]
    draft: Draft
    fetch: Fetch
    tokens: torch.Tensor  # the drafted ids by row, on the device: the next step's fed rows read them
    # Rows fed a drafted id that `finish` then changed (the rare whole-vocabulary sort): their
    # result is discarded and the row decoded again from the right id.
    stale: set[Sequence] = field(default_factory=set)


class BatchedEngine:
    runner: ModelRunner  # set up on the engine's thread, with the output stage and grammars
    outputs: OutputStage
    _grammars: Grammars
    max_context: int  # the configured one, or what fits a GPU's memory

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        weights: WeightFormat = "fp32",
        max_batch_size: int = 16,
        max_context: int | None = None,
        prefill_chunk_tokens: int | None = None,
        prefix_caching: bool = True,
        max_chunks_per_s: float = 150.0,
        max_stream_chunks_per_s: float = 40.0,
        cuda_graphs: bool = True,
        gpu_memory_fraction: float = 0.9,
        overlap_steps: bool | None = None,
        newcomers_first: bool | None = None,
    ):
        self._tokenizer = loaded.tokenizer
        self.device = loaded.device
        is_cuda = self.device.type == "cuda"
        # Queue each decode step before reading the last one's ids (see `_step`). Default: on a
        # GPU, where the device then computes while the host streams text; on the CPU the host
        # is the device, so it would only deliver every token a step later.
        self.overlap_steps = is_cuda if overlap_steps is None else overlap_steps
        self._launched: _Launched | None = None
        self.max_batch_size = max_batch_size
        # Newcomers' prompt tokens a step takes. 2,048 on a GPU, where an eager step of short
        # prompts costs its kernel launches almost whatever its tokens, so new chats arriving
        # together share few steps; 256 on a CPU, where every token costs (docs/engine.md).
        # A newcomer's prompt in a step of its own, before the running requests' next tokens
        # (`Scheduler.plan`). Default: on a CPU, where a step of 8 streams takes about twice a
        # one-row step, so under load a newcomer's first token comes a decode step sooner
        # (docs/engine.md); off on a GPU, where it is not measured yet.
        self.scheduler = Scheduler(
            max_batch_size,
            prefill_chunk_tokens or (2048 if is_cuda else 256),
            prefix_caching,
            newcomers_first=not is_cuda if newcomers_first is None else newcomers_first,
        )
        self._eos_ids = eos_token_ids(loaded)
        self._posts = Posts()  # written and delivered by the engine thread only
        self._wakeup = threading.Condition()
        self._is_shut_down = False
        self._total = 0
        # All torch work, setup included, happens on the engine's thread (see torch_threads).
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        # Handed over through an attribute, not the thread's args (which live as long as the
        # thread), so the caller can free transformers' copy of the weights once we are set up.
        self._to_load: tuple | None = (
            loaded,
            weights,
            max_context or loaded.context_length,
            gpu_memory_fraction,
            cuda_graphs,
            max_chunks_per_s,
            max_stream_chunks_per_s,
        )
        self._thread = threading.Thread(target=self._run, name="batched-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            raise self._setup_error

    def _setup(
        self,
        loaded: LoadedModel,
        weights: WeightFormat,
        max_context: int,
        gpu_memory_fraction: float,
        cuda_graphs: bool,
        max_chunks_per_s: float,
        max_stream_chunks_per_s: float,
    ) -> None:
        runner: ModelRunner
        if self.device.type == "cuda":  # the runner for the device, chosen once
            runner = CudaModelRunner(loaded, weights, self.max_batch_size, max_context, gpu_memory_fraction, cuda_graphs)
        else:
            runner = ModelRunner(loaded, weights, self.max_batch_size, max_context)
        self.runner = runner
        self.max_context = runner.max_context
        self.outputs = OutputStage(self._tokenizer, self._eos_ids, runner.max_context, max_chunks_per_s, max_stream_chunks_per_s)
        self._grammars = Grammars(self._tokenizer, runner.vocab_size, self._eos_ids)
        logger.info(
            "Batched engine on %s: %s weights, batch %d, context %d, KV cache %.0f MiB%s, CUDA graphs %s",
            self.device,
            weights,
            self.max_batch_size,
            self.max_context,
            runner.cache.size_bytes / 2**20,
            "" if self.device.type == "cuda" else " (grows with the longest request)",
            "on" if runner.graphs is not None else "off",
        )

    # --- the asyncio side -------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationOutput, None]:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: it has no tokens")
        if len(prompt_token_ids) >= self.max_context:
            raise PromptTooLongError.of(len(prompt_token_ids), self.max_context, 1, "the engine")
        check_logit_bias(params, self.runner.vocab_size)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        try:
            sampling = SlotSampling.entry(-1, params, seed, len(prompt_token_ids))  # its slot comes at admission
        except ValueError as exc:  # e.g. a top_k beyond int64
            raise InvalidRequestError(f"sampling parameters the engine cannot represent: {exc}") from exc
        matcher = None if params.constraint is None else await self._matcher(params)
        seq = Sequence(
            prompt_ids=list(prompt_token_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            outputs=asyncio.Queue(),
            posts=self._posts,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_matcher=StopStringMatcher(params.stop),
            sampling=sampling,
            matcher=matcher,
        )
        if seq.scores_prompt:
            self.outputs.open_prompt(seq)
        with self._wakeup:
            if self._is_shut_down:
                raise EngineShutDownError("the engine is shut down")
            self.scheduler.waiting.append(seq)
            self._total += 1
            self._wakeup.notify()
        try:
            while True:
                item = await seq.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Closed early (client gone) or finished: either way the engine may drop it now.
            seq.is_cancelled = True
            with self._wakeup:
                self._wakeup.notify()

    async def _matcher(self, params: SamplingParams) -> llguidance.LLMatcher:
        """A matcher for the request's constraint: compiled in a worker thread the first time
        (a large schema takes long to compile, and the caller's loop serves other requests)."""
        check_constraint(params)
        constraint = params.constraint
        assert constraint is not None
        if self._grammars.is_compiled(constraint):
            return self._grammars.matcher(constraint)
        return await asyncio.to_thread(self._grammars.matcher, constraint)

    def stats(self) -> EngineStats:
        return EngineStats(
            active_requests=self.scheduler.active,
            queued_requests=len(self.scheduler.waiting),
            total_requests=self._total,
            reused_prompt_tokens=self.scheduler.reused_prompt_tokens,
        )

    def shutdown(self) -> None:
        with self._wakeup:
            self._is_shut_down = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            assert self._to_load is not None
            self._setup(*self._to_load)
            self._to_load = None
        except BaseException as exc:  # noqa: BLE001 - raised by __init__ in the caller's thread
            self._setup_error = exc
            return
        finally:
            self._ready.set()
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._is_shut_down and not self._has_work():
                        self._wakeup.wait()
                    if self._is_shut_down:
                        break
                    self.runner.admit(self.scheduler.admit())
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - fail the requests in the step, keep serving
                    logger.exception("engine step failed")
                    self._launched = None
                    for seq in self.scheduler.running():
                        seq.send(exc)
                        self.scheduler.free(seq, keep_cache=False)  # the failed step may have written part of it
                self._posts.deliver()
        error = EngineShutDownError("the engine shut down")
        for seq in [*self.scheduler.running(), *self.scheduler.waiting]:
            seq.send(error)
        self._posts.deliver()

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or self._launched is not None

    def _step(self) -> None:
        self.scheduler.drop_cancelled()
        if self._launched is not None:
            launched, self._launched = self._launched, None
            if self.scheduler.is_decoding_alone():
                # Steady decoding: the next step is queued before this one's ids are read, so
                # the device computes it while the host streams this one's text.
                self._launched = self._launch_decode(launched)
            self._complete(launched)
            return  # else newcomers are admitted and planned with every row's ids on the host
        plan = self.scheduler.plan()
        self.runner.copy_prefixes(plan.copies)
        if not plan.chunks and self.overlap_steps and not any(seq.steps_alone for seq in plan.sampled):
            self._launched = self._launch_decode(None)
        elif not plan.is_empty:
            self._run_step(plan)

    def _run_step(self, plan: StepPlan) -> None:
        """Runs `plan` and reads its ids at once (prompt chunks, or rows needing the host)."""
        sampled = plan.sampled
        decode = [DecodeRow(s.slot, s.length - 1, s.generated[-1]) for s in plan.decode]
        matchers = [(row, seq.matcher) for row, seq in enumerate(sampled) if seq.matcher is not None]
        scored = [row for row, seq in enumerate(sampled) if seq.params.logprobs is not None]
        top = max((sampled[row].params.logprobs or 0 for row in scored), default=0)
        result = self.runner.run(
            Step(
                decode,
                plan.chunks,
                Needs.of(s.params for s in sampled),
                constrained=ConstrainedRows([r for r, _ in matchers], [m for _, m in matchers]) if matchers else None,
                scored=ScoredRows(scored, top),
                prompt_top=max((s.params.prompt_logprobs or 0 for s in plan.scoring), default=0),
            )
        )
        if result.prompt_logprobs is not None:
            self.outputs.score_prompts(plan.scoring, result.prompt_logprobs)
        tokens = finish(result.draft)  # the one transfer back per step: the chosen ids
        logprobs: dict[int, TokenLogprobs] = {}
        if result.logprobs is not None:
            logprobs = dict(zip(scored, result.logprobs.of([tokens[row] for row in scored])))
        self._emit(list(zip(sampled, tokens)), logprobs)

    def _launch_decode(self, previous: _Launched | None) -> _Launched | None:
        """Queues a decode step for every running request without waiting for `previous` (the
        step queued before it, if any): a request with a row there continues from the id that
        row drafts, read on the device. Requests whose drafted id is predictably their last
        (max_tokens, the context) sit this step out."""
        previous_row = (
            {} if previous is None else {seq: row for row, seq in enumerate(previous.seqs) if seq not in previous.stale}
        )
        decode: list[DecodeRow] = []
        seqs = []
        for seq in self.scheduler.running():
            if not seq.is_prefilled:
                continue
            row = previous_row.get(seq, -1)
            if row >= 0:
                if seq.is_at_limit(self.max_context, pending=1):
                    continue
                decode.append(DecodeRow(seq.slot, seq.length, 0, row))
            else:
                decode.append(DecodeRow(seq.slot, seq.length - 1, seq.generated[-1]))
            seqs.append(seq)
        if not seqs:
            return None
        needs = Needs.of(s.params for s in seqs)
        result = self.runner.run(Step(decode, [], needs, None if previous is None else previous.tokens, pending=True))
        return _Launched(seqs, [row.position for row in decode], result.draft, Fetch.start(result.draft), result.tokens)

    def _complete(self, launched: _Launched) -> None:
        """Reads `launched`'s ids and advances its requests; rows whose request was freed
        meanwhile (finished, cancelled) or which were fed a wrong id are dropped."""
        drafted, _ = launched.fetch.wait()
        tokens = finish(launched.draft, launched.fetch)
        valid = [
            (seq, token)
            for seq, position, token in zip(launched.seqs, launched.positions, tokens)
            if self.scheduler.holds(seq) and seq not in launched.stale and position == seq.length - 1
        ]
        if drafted != tokens and self._launched is not None:
            fed = {seq for seq, position in zip(self._launched.seqs, self._launched.positions) if position == seq.length}
            for seq, drafted_id, token in zip(launched.seqs, drafted, tokens):
                if drafted_id != token and seq in fed:
                    self._launched.stale.add(seq)
        self._emit(valid)

    def _emit(self, tokens: list[tuple[Sequence, int]], logprobs: dict[int, TokenLogprobs] | None = None) -> None:
        for seq in self.outputs.emit(tokens, self.scheduler.active, logprobs):
            self.scheduler.free(seq)  # before its finish is delivered, so the caller sees the slot free
