"""Token ids to streamed text, one token at a time, plus stop strings.

`IncrementalDetokenizer` re-decodes a short window of recent tokens (vLLM's prefix/read
offsets) so a character split over several byte-level tokens is emitted only once complete,
and SentencePiece-style leading spaces are neither dropped nor doubled: the concatenated
deltas equal `tokenizer.decode(all ids, skip_special_tokens=True)`. `StopStringMatcher` holds
back text that might be the start of a stop string and cuts the output before one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        # The Rust tokenizer itself where transformers' wrapper would add nothing: its
        # `decode` spends ~20 us a call converting arguments, ten times the decoding, and a GPU
        # engine decodes two windows per token for hundreds of streams every few milliseconds.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: decoding from here gives the context right
        self._read_offset = 0  # tokens before this have been emitted as text
        self.emitted_text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        # transformers types `decode` as str | list[str]: a list only for a batch of sequences, never for flat ids.
        return self._tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[return-value]

    def add(self, token_id: int) -> str:
        """The new complete text that `token_id` adds ("" while a character is incomplete)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        delta = new_text[len(prefix_text) :]
        self.emitted_text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever the full decode has beyond what was emitted (e.g. a
        character cut off by max_tokens decodes to U+FFFD, as `tokenizer.decode` does)."""
        full = self._decode(self.token_ids)
        if not full.startswith(self.emitted_text):
            return ""
        delta = full[len(self.emitted_text) :]
        self.emitted_text = full
        return delta


class StopStringMatcher:
    """Feed text deltas; get back what may be shown now. Text that could still grow into a stop
    string is held back until it can't; at a stop string, everything from it on is dropped."""

    def __init__(self, stop: tuple[str, ...]):
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.is_stopped = False

    def feed(self, text: str) -> str:
        if not self._stop:
            return text
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.is_stopped, self._held = True, ""
            return pending[:cut]
        hold = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        self._held = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
