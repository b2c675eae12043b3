"""The batched engine's key/value cache: one preallocated tensor pair per layer, one row
("slot") per running request, written in place at each token's position (gpt-fast style).

Owns: the storage, its growth, and its two writes: `update` (a step's new keys/values) and
`copy_positions` (prefix caching). Does not own which request holds which slot or which tokens
a row holds (the engine does), or the attention masks (see `llama_forward`).
"""

from __future__ import annotations

import torch

INITIAL_CAPACITY = 512


class KVCache:
    """k[layer], v[layer]: [max_batch_size, n_kv_heads, capacity, head_dim]. The capacity (in
    positions) starts small and doubles up to `max_context` when a request gets that long:
    SmolLM2's full 8192-token context at batch 16 would be 6 GiB of fp32 up front, while most
    chats stay under a few hundred tokens. Growing copies the cache once per doubling."""

    def __init__(
        self, n_layers: int, max_batch_size: int, n_kv_heads: int, max_context: int, head_dim: int, dtype: torch.dtype
    ):
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self._shape = (max_batch_size, n_kv_heads, min(INITIAL_CAPACITY, max_context), head_dim)
        # Zeros, not empty: attention reads every position up to the longest row, and a masked
        # position still multiplies its value by a zero weight, so it must not hold NaN garbage.
        self.k = [torch.zeros(self._shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(self._shape, dtype=dtype) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self._shape[2]

    @property
    def size_bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def reserve(self, length: int) -> None:
        """Makes room for positions [0, length); call before a step that writes up to there."""
        if length <= self.capacity:
            return
        if length > self.max_context:
            raise ValueError(f"{length} positions exceed the cache's maximum context of {self.max_context}")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        self._shape = (*self._shape[:2], min(capacity, self.max_context), self._shape[3])

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(self._shape, dtype=old.dtype)
            new[:, :, : old.shape[2]] = old
            return new

        self.k = [grown(t) for t in self.k]
        self.v = [grown(t) for t in self.v]

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """Where token i's heads go in a flat [rows * heads * capacity, head_dim] view of every
        layer's cache: [N * n_kv_heads]. Computed once per step, used by every layer."""
        heads = torch.arange(n_kv_heads)
        return ((slots[:, None] * n_kv_heads + heads) * self.capacity + positions[:, None]).reshape(-1)

    def update(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes the step's keys/values ([N, n_kv_heads, head_dim]) at `write_index`'s places."""
        # index_copy_ into a flat view: several times faster than advanced-index assignment
        # (cache[slots, :, positions] = k), and this runs twice per layer per step.
        head_dim = k.shape[-1]
        self.k[layer].view(-1, head_dim).index_copy_(0, index, k.reshape(-1, head_dim))
        self.v[layer].view(-1, head_dim).index_copy_(0, index, v.reshape(-1, head_dim))

    def copy_positions(self, source: int, target: int, start: int, end: int) -> None:
        """Copies slot `source`'s keys/values at positions [start, end) into slot `target`
        (prefix caching: the same tokens at the same positions have the same K/V)."""
        for k, v in zip(self.k, self.v):
            k[target, :, start:end] = k[source, :, start:end]
            v[target, :, start:end] = v[source, :, start:end]
