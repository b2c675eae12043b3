"""Sampling parameters: the one shape every API request becomes before it reaches an engine.

The original API's body and the OpenAI bodies both convert into `SamplingParams` (see
`serve_app.protocol`), so their semantics cannot drift apart. Ranges are checked at the HTTP
edge; this class only carries values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGIT_BIAS = 300  # tokens one request may bias


@dataclass(frozen=True)
class Constraint:
    """What an answer must match, token by token (see `engine.grammar`): a JSON schema (its JSON
    text) or a Lark grammar (llguidance's dialect)."""

    json_schema: str | None = None  # OpenAI's json_object is '{"type": "object"}'
    lark: str | None = None
    field: str = "response_format"  # the request field it came from, named in errors


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    # 0 means greedy decoding.
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    # The original's semantics: a logit of a token seen in the last `repeat_last_n` tokens is
    # divided by the penalty when positive and multiplied by it when negative; 1.0 disables it.
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    # OpenAI's penalties, over the tokens generated so far (as vLLM; the prompt does not count):
    # a token's logit loses `presence_penalty` once it has appeared and `frequency_penalty` for
    # each time it has. Applied after the repeat penalty; 0 disables each.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: (token id, value added to its logit) pairs, at most MAX_LOGIT_BIAS,
    # applied first (before the penalties, as vLLM). -100 in effect bans a token.
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    ignore_eos: bool = False
    # Decoding follows this grammar (structured outputs, tool calls); None: free text.
    constraint: Constraint | None = None
    # Log-probabilities of each generated token and of its `logprobs` most likely alternatives
    # (0: the token's own only), from the model's logits before any sampling setting; None: none.
    logprobs: int | None = None
    # The same for every prompt token but the first (which nothing predicts), with this many
    # alternatives each, before the answer's: a completion's `echo` (evaluation harnesses score
    # a text this way). Such a prompt is computed whole, none of it taken from the prefix cache.
    prompt_logprobs: int | None = None
    # The room kept for the answer when a prompt is fitted to the model's context (a chat's
    # oldest turns dropped, a prompt refused as too long); None: all of `max_tokens`. Less where
    # `max_tokens` only bounds an answer the client left unbounded (OpenAI's APIs: until the
    # context ends), so a long chat is not cut to make room for the whole bound.
    reserve_tokens: int | None = None

    @property
    def answer_room(self) -> int:
        return min(self.max_tokens, self.reserve_tokens or self.max_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_filtered(self) -> bool:
        """Top-k or top-p cut the vocabulary (when sampling)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def penalizes_repeats(self) -> bool:
        """The repeat penalty changes logits."""
        return self.repeat_penalty != 1.0 and self.repeat_last_n > 0

    @property
    def penalizes_occurrences(self) -> bool:
        """The presence or the frequency penalty changes logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
