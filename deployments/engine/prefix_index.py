"""Which cache row holds the longest start of a prompt: the lookup behind prefix caching (see
`batched`), for newcomers against the rows in use, the rows left by finished requests, and the
prompts being prefilled in the same step."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many tokens `a` and `b` share from the start, at most `limit`."""
    limit = min(limit, len(a), len(b))
    if limit <= 0 or a[0] != b[0]:
        return 0
    if a[:limit] == b[:limit]:
        return limit
    # Binary search with slice comparisons, which run in C.
    low, high = 1, limit  # a[:low] matches, a[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class PrefixIndex:
    """Token lists, each with the cache slot that holds it, in lexicographic order. The list
    sharing the longest start with a prompt sorts right before or after it (a list sorting
    further away shares no more with the prompt than the one in between), so a lookup is a
    binary search and two comparisons instead of one comparison per row. Comparing every
    newcomer with every row grew with the square of the streams arriving together and delayed
    each one's first token; keeping the rows sorted costs less than one newcomer's linear scan
    (figures: docs/gpu.md)."""

    def __init__(self, entries: Iterable[tuple[list[int], int]] = ()):
        self._entries = sorted(entries)  # (tokens, slot): equal token lists in slot order

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tokens: list[int], slot: int) -> None:
        bisect.insort(self._entries, (tokens, slot))

    def discard(self, tokens: list[int], slot: int) -> None:
        at = bisect.bisect_left(self._entries, (tokens, slot))
        if at < len(self._entries) and self._entries[at] == (tokens, slot):
            del self._entries[at]

    def longest(self, prompt: list[int], limit: int, exclude: int = -1) -> tuple[int, int]:
        """(shared, slot): the most tokens from `prompt`'s start, at most `limit`, that a list
        holds, and that list's slot, leaving out slot `exclude`'s lists; (0, -1) if none shares
        a token."""
        at = bisect.bisect_left(self._entries, (prompt,))  # the first list not before the prompt
        best = (0, -1)
        for neighbour in (self._next(at - 1, -1, exclude), self._next(at, 1, exclude)):
            if neighbour is not None:
                tokens, slot = self._entries[neighbour]
                shared = common_prefix(prompt, tokens, limit)
                if shared > best[0]:
                    best = (shared, slot)
        return best

    def _next(self, at: int, direction: int, exclude: int) -> int | None:
        """The first position from `at` on, going `direction`, whose slot is not `exclude`."""
        while 0 <= at < len(self._entries):
            if self._entries[at][1] != exclude:
                return at
            at += direction
        return None
