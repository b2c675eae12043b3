"""The batched engine's key/value cache: one preallocated tensor pair per layer, one row
("slot") per running request, written in place at each token's position (gpt-fast style).

Owns: the storage, its growth, `record_tokens` (each step's token ids) and `copy_positions`
(prefix caching). Does not own writing a step's keys/values (each device's `rope_and_cache_write`
does, see `forward.layer_ops`), which request holds which slot (the engine does), or attention
(see `forward`).
"""

from __future__ import annotations

import torch

INITIAL_CAPACITY = 512


class KVCache:
    """k[layer], v[layer]: [rows, n_kv_heads, capacity, head_dim], rows = max_batch_size + 1:
    the last row is scratch, where the padding tokens of a fixed-shape step (a CUDA graph's
    batch bucket) write. `tokens` [rows, capacity]: the token id at each position, which the
    sampler's repeat penalty reads on the device.

    The capacity (in positions) starts at `initial_capacity` and doubles up to `max_context`
    when a request gets that long: SmolLM2's full 8192-token context at batch 16 would be
    6 GiB of fp32 up front, while most chats stay under a few hundred tokens. Growing copies the
    cache once per doubling. A GPU engine allocates the whole context at once instead: CUDA
    graphs hold the cache's addresses, so it must never move."""

    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        n_kv_heads: int,
        max_context: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        initial_capacity: int = INITIAL_CAPACITY,
    ):
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.scratch_slot = max_batch_size
        self.device = torch.device(device)
        # One tensor [layers, 2 (k, v), rows, n_kv_heads, capacity, head_dim], so copying a prefix
        # between rows is one op for every layer (a GPU pays per launch), and k/v per layer are
        # views of it. Zeros, not empty: the CPU's attention reads every position up to the
        # longest row, and a masked position still multiplies its value by a zero weight, so it
        # must not hold NaN garbage.
        capacity = min(initial_capacity, max_context)
        self.kv = torch.zeros(n_layers, 2, max_batch_size + 1, n_kv_heads, capacity, head_dim, dtype=dtype, device=self.device)
        self.tokens = torch.zeros(max_batch_size + 1, capacity, dtype=torch.long, device=self.device)
        self._split_layers()

    def _split_layers(self) -> None:
        self.k = list(self.kv[:, 0].unbind(0))  # k[layer]: [rows, n_kv_heads, capacity, head_dim]
        self.v = list(self.kv[:, 1].unbind(0))

    @staticmethod
    def bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """What one position of one row costs: keys and values of every layer, plus its token id."""
        return 2 * n_layers * n_kv_heads * head_dim * dtype.itemsize + 8

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def size_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.tokens.numel() * self.tokens.element_size()

    def reserve(self, length: int) -> None:
        """Makes room for positions [0, length); call before a step that writes up to there."""
        if length <= self.capacity:
            return
        if length > self.max_context:
            raise ValueError(f"{length} positions exceed the cache's maximum context of {self.max_context}")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        kv = self.kv.new_zeros(*self.kv.shape[:4], capacity, self.kv.shape[5])
        kv[:, :, :, :, : self.capacity] = self.kv
        tokens = self.tokens.new_zeros(self.tokens.shape[0], capacity)
        tokens[:, : self.tokens.shape[1]] = self.tokens
        self.kv, self.tokens = kv, tokens
        self._split_layers()

    def record_tokens(self, slots: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Notes which token each of the step's positions holds (for the repeat penalty)."""
        self.tokens[slots, positions] = token_ids

    def copy_positions(self, source: int, target: int, start: int, end: int) -> None:
        """Copies slot `source`'s keys/values (and token ids) at positions [start, end) into slot
        `target` (prefix caching: the same tokens at the same positions have the same K/V)."""
        self.kv[:, :, target, :, start:end] = self.kv[:, :, source, :, start:end]
        self.tokens[target, start:end] = self.tokens[source, start:end]
