"""Turning a step's token ids into what each request receives: text, stops, logprobs.

Owns: detokenizing, stop strings, EOS, a finished grammar, max_tokens and the context, and how
often a request is sent its text (coalescing). Does not own the slots (the engine frees those
of the requests this stage finishes) or the hand-over to the event loops (`sequence.Posts`).
"""

from __future__ import annotations

import logging
import math
import time

from transformers import PreTrainedTokenizerBase

from deployments.engine.detokenizer import IncrementalDetokenizer
from deployments.engine.model_runner import PromptLogprobs
from deployments.engine.protocol import FinishReason, GenerationOutput
from deployments.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# A sampled token's logprob and its row's top alternatives, (id, logprob) most likely first
# (`sampler.StepLogprobs.of`).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class OutputStage:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: tuple[int, ...],
        max_context: int,
        max_chunks_per_s: float,
        max_stream_chunks_per_s: float,
    ):
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self.max_context = max_context
        self.max_chunks_per_s = max_chunks_per_s
        self.max_stream_chunks_per_s = max_stream_chunks_per_s
        self._token_texts: dict[int, str] = {}
        self._window_start = -math.inf

    def emit(
        self, tokens: list[tuple[Sequence, int]], streams: int, logprobs: dict[int, TokenLogprobs] | None = None
    ) -> list[Sequence]:
        """Appends each request its token (and the logprobs of row i, if asked); returns the
        requests this finished. `streams`: the requests the engine runs, these rows or not."""
        now = time.monotonic()
        window = self._window(streams, now)
        logprobs = logprobs or {}
        return [seq for row, (seq, token) in enumerate(tokens) if self._advance(seq, token, now, window, logprobs.get(row))]

    def open_prompt(self, seq: Sequence) -> None:
        """For a request whose prompt's logprobs are asked: its prompt tokens' texts, and its
        first token's entry (no logprob: nothing comes before it)."""
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        seq.prompt_pieces = [detokenizer.add(token) for token in seq.prompt_ids]
        seq.prompt_pieces[-1] += detokenizer.flush()
        seq.unsent_logprobs.append([seq.prompt_pieces[0], None, None])

    def score_prompts(self, seqs: list[Sequence], scores: PromptLogprobs) -> None:
        """Each scored row's logprobs, for the prompt token after its position, in order."""
        by_slot = {seq.slot: seq for seq in seqs}
        targets = [by_slot[slot].prompt_ids[position + 1] for slot, position in scores.rows]
        for (slot, position), (logprob, top) in zip(scores.rows, scores.logprobs.of(targets)):
            seq = by_slot[slot]
            alternatives = [[self._token_text(t), lp] for t, lp in top[: seq.params.prompt_logprobs]]
            seq.unsent_logprobs.append([seq.prompt_pieces[position + 1], logprob, alternatives])

    def _window(self, streams: int, now: float) -> float:
        """When the replica's current window of chunks began: a request is sent its text at
        its first step in a window (its first token and its end at once). Every streamed chunk
        costs CPU in the replica, the ingress, the proxy and the client, taken from the engine on
        a small machine. So a window lasts at least 1 / `max_stream_chunks_per_s` and
        streams / `max_chunks_per_s` (the caller picks them for its device: fewer where the cores
        are shared): many streams get their text every few steps; a single stream gets every
        token when a step takes longer than the window. The windows are the replica's, not each
        request's, so the streams due go together in one step's frame: each wake-up of the
        processes downstream serves them all. (By the streams running, not this step's rows: a
        newcomer's prompt runs in a step of its own, which must not start a window for all.)"""
        interval = max(1 / self.max_stream_chunks_per_s, streams / self.max_chunks_per_s)
        if interval == 0:
            return math.inf  # every token as it comes
        if now >= self._window_start + interval:
            self._window_start = now
        return self._window_start

    def _advance(self, seq: Sequence, token: int, now: float, window: float, logprobs: TokenLogprobs | None) -> bool:
        """Appends one token (with its logprobs, if asked: its own and its alternatives'); sends
        the request its new text if it was sent none since `window` began (or this is its
        first), and the finish if it is done. Whether it is."""
        seq.generated.append(token)
        piece = seq.detokenizer.add(token)
        # Like the usage, without the EOS that ends the answer.
        if logprobs is not None and (token not in self._eos_ids or seq.params.ignore_eos):
            logprob, top = logprobs
            alternatives = [[self._token_text(t), lp] for t, lp in top[: seq.params.logprobs]]
            seq.unsent_logprobs.append([piece, logprob, alternatives])
        text = seq.stop_matcher.feed(piece)
        finish: FinishReason | None = None
        # Like OpenAI's usage, the completion count leaves out the EOS token that ends it.
        completion_tokens = len(seq.generated)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            logger.error("a constrained answer took a token its grammar refused: %s", seq.matcher.get_error())
        if seq.stop_matcher.is_stopped:
            finish = "stop"
        elif token in self._eos_ids and not seq.params.ignore_eos:
            finish = "stop"
            completion_tokens -= 1
        elif seq.matcher is not None and seq.matcher.is_stopped():
            finish = "stop"  # the grammar is complete: nothing but EOS could follow (ignore_eos or not)
            completion_tokens -= token in self._eos_ids
        elif seq.is_at_limit(self.max_context):
            finish = "length"
        if finish is not None and not seq.stop_matcher.is_stopped:
            text += seq.stop_matcher.feed(seq.detokenizer.flush())
            if seq.stop_matcher.is_stopped:
                finish = "stop"
            else:
                text += seq.stop_matcher.flush()
        seq.unsent_text += text
        if finish is not None or (seq.unsent_text and seq.last_sent < window):
            logprobs_out = seq.unsent_logprobs if seq.params.logprobs is not None or seq.scores_prompt else None
            seq.send(GenerationOutput(seq.unsent_text, len(seq.prompt_ids), completion_tokens, finish, logprobs_out))
            seq.unsent_text, seq.unsent_logprobs, seq.last_sent = "", [], now
        return finish is not None

    def _token_text(self, token: int) -> str:
        """A token's text on its own, as a logprob's alternative shows it (kept: at most the
        vocabulary's texts, and a few decodes a token saved for every request asking)."""
        if token not in self._token_texts:
            # transformers types `decode` as str | list[str]: a list only for a batch of sequences.
            self._token_texts[token] = self._tokenizer.decode([token])  # type: ignore[assignment]
        return self._token_texts[token]
