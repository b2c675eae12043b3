"""The reference engine: transformers' `generate` in one worker thread, one request at a time.

Simple on purpose; it implements the same `protocol.Engine` contract as the batched
engine and serves as its baseline in tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

import llguidance
import torch
from transformers import (
    AsyncTextIteratorStreamer,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from deployments.engine.grammar import Grammars, Masks
from deployments.engine.protocol import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    InvalidRequestError,
    check_constraint,
    check_logit_bias,
)
from deployments.engine.sampling_params import SamplingParams
from deployments.model_loader import LoadedModel, eos_token_ids


class RecentRepetitionPenalty(LogitsProcessor):
    """The original's repeat penalty: only the last `last_n` tokens (prompt included) count.
    transformers' processor has the same sign rule but looks at the whole sequence, so we hand
    it the window."""

    def __init__(self, penalty: float, last_n: int):
        self._penalty = RepetitionPenaltyLogitsProcessor(penalty)
        self._last_n = last_n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self._penalty(input_ids[:, -self._last_n :], scores)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a value added to each listed token's logit."""

    def __init__(self, bias: tuple[tuple[int, float], ...], device: torch.device):
        self._ids = torch.tensor([token for token, _ in bias], device=device)
        self._values = torch.tensor([value for _, value in bias], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        biased = scores.index_add(1, self._ids, self._values.to(scores.dtype).expand(scores.shape[0], -1))
        return biased  # type: ignore[return-value]  # transformers types scores as the legacy FloatTensor


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated after the prompt's
    `prompt_tokens` (transformers has neither): counted, then subtracted as OpenAI documents
    them."""

    def __init__(self, presence: float, frequency: float, prompt_tokens: int):
        self._presence, self._frequency, self._prompt_tokens = presence, frequency, prompt_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self._prompt_tokens :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        penalized = scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)
        return penalized  # type: ignore[return-value]  # transformers types scores as the legacy FloatTensor


class GrammarMask(LogitsProcessor):
    """A constrained request's allowed next tokens (see `grammar`): every other token's score
    is -inf. Its matcher takes each new token in `GrammarComplete`."""

    def __init__(self, matcher: llguidance.LLMatcher, masks: Masks):
        self._matcher, self._masks = matcher, masks

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._masks.apply(scores, [0], self._masks.fill([self._matcher]))
        return scores


class GrammarComplete(StoppingCriteria):
    """Feeds each new token to the request's matcher; stops once its grammar is complete."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self._matcher.consume_token(int(input_ids[0, -1]))
        done = torch.tensor([self._matcher.is_stopped()], device=input_ids.device)
        return done  # type: ignore[return-value]  # see _StopWhenCancelled


class _StopWhenCancelled(StoppingCriteria):
    def __init__(self, cancelled: threading.Event):
        self._cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        # transformers types the result as torch.BoolTensor, a legacy class no torch function is typed to return.
        cancelled = torch.full((input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool, device=input_ids.device)
        return cancelled  # type: ignore[return-value]


class ReferenceEngine:
    """One request at a time through `model.generate` on a single worker thread, so the
    replica's event loop never blocks on torch. Requests wait their turn in the executor."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        model = loaded.require_model()
        if not isinstance(model, GenerationMixin):
            raise TypeError(f"{type(model).__name__} cannot generate: the reference engine needs a causal LM")
        self._model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-engine")
        self._eos_ids = eos_token_ids(loaded)
        self._vocab_size = model.get_output_embeddings().weight.shape[0]
        self._grammars = Grammars(loaded.tokenizer, self._vocab_size, self._eos_ids)
        self._masks = Masks(self._vocab_size, 1)  # one request at a time: one bitmask row, one llguidance pool
        self._active = 0
        self._waiting = 0
        self._total = 0

    def stats(self) -> EngineStats:
        return EngineStats(self._active, self._waiting, self._total)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _generate_blocking(
        self, prompt_ids: list[int], params: SamplingParams, streamer, cancelled, matcher: llguidance.LLMatcher | None
    ) -> torch.Tensor:
        model, tokenizer = self._model, self._loaded.tokenizer
        if params.seed is not None:
            torch.manual_seed(params.seed)
        processors = LogitsProcessorList()
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias, self._loaded.device))
        if params.penalizes_repeats:
            processors.append(RecentRepetitionPenalty(params.repeat_penalty, params.repeat_last_n))
        if params.penalizes_occurrences:
            processors.append(OccurrencePenalty(params.presence_penalty, params.frequency_penalty, len(prompt_ids)))
        stopping = StoppingCriteriaList([_StopWhenCancelled(cancelled)])
        if matcher is not None:
            processors.append(GrammarMask(matcher, self._masks))  # last: after bias and penalties
            stopping.append(GrammarComplete(matcher))
        input_ids = torch.tensor([prompt_ids], device=self._loaded.device)
        with torch.inference_mode():
            return model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                min_new_tokens=params.min_tokens or None,
                do_sample=not params.is_greedy,
                temperature=params.temperature if not params.is_greedy else None,
                top_p=params.top_p if not params.is_greedy else None,
                top_k=params.top_k if not params.is_greedy else None,
                logits_processor=processors,
                stopping_criteria=stopping,
                stop_strings=list(params.stop) or None,
                tokenizer=tokenizer,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationOutput, None]:
        check_logit_bias(params, self._vocab_size)
        check_constraint(params)
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise InvalidRequestError("logprobs: the reference engine does not give them; serve the model with engine: batched")
        matcher = None if params.constraint is None else self._grammars.matcher(params.constraint)
        tokenizer = self._loaded.tokenizer
        streamer = AsyncTextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        prompt_tokens = len(prompt_token_ids)
        self._waiting += 1
        self._total += 1

        def run() -> torch.Tensor:
            self._waiting -= 1
            self._active += 1
            try:
                return self._generate_blocking(prompt_token_ids, params, streamer, cancelled, matcher)
            except BaseException:
                streamer.end()  # unblock the reader; the future carries the error
                raise
            finally:
                self._active -= 1

        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        pieces = 0
        try:
            async for text in streamer:
                if text:
                    pieces += 1
                    yield GenerationOutput(text, prompt_tokens, pieces)
            sequences = await future
        finally:
            cancelled.set()
        # The streamer merges tokens into words, so count tokens from the final sequence. Like
        # OpenAI's usage, the count excludes the EOS token and the padding after it.
        generated = sequences[0, prompt_tokens:].tolist()
        finish: FinishReason = "length"
        end_ids = {tokenizer.pad_token_id, *self._eos_ids}
        while generated and generated[-1] in end_ids:
            generated.pop()
            finish = "stop"
        if len(generated) < params.max_tokens:
            finish = "stop"  # a stop string
        yield GenerationOutput("", prompt_tokens, len(generated), finish)
