"""The prefix index finds what comparing a prompt with every cache row finds."""

import random

from deployments.engine.prefix_index import PrefixIndex, common_prefix


def brute_force(entries: list[tuple[list[int], int]], prompt: list[int], limit: int, exclude: int = -1) -> int:
    return max([common_prefix(prompt, tokens, limit) for tokens, slot in entries if slot != exclude], default=0)


def random_rows(rng: random.Random, count: int) -> list[list[int]]:
    """Rows that share starts of different lengths (a system prompt, earlier turns), over a
    small vocabulary so that near misses are common; some rows are prefixes of others."""
    trunk = [rng.randrange(4) for _ in range(40)]
    rows = []
    for _ in range(count):
        start = trunk[: rng.randrange(len(trunk) + 1)]
        rows.append(start + [rng.randrange(4) for _ in range(rng.randrange(12))])
    return [row for row in rows if row]


def test_common_prefix_counts_the_shared_start_up_to_the_limit():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert common_prefix([5, 2], [1, 2], 10) == 0
    assert common_prefix([], [1], 10) == 0
    assert common_prefix(list(range(1000)), list(range(777)) + [0], 5000) == 777


def test_the_longest_shared_start_is_found_among_the_neighbours():
    rng = random.Random(0)
    for _ in range(300):
        rows = random_rows(rng, rng.randrange(1, 30))
        entries = [(row, slot) for slot, row in enumerate(rows)]
        index = PrefixIndex(entries)
        for prompt in random_rows(rng, 10) + rows:
            limit = rng.choice([len(prompt) - 1, len(prompt), 5])
            exclude = rng.choice([-1, rng.randrange(len(rows))])
            shared, slot = index.longest(prompt, limit, exclude)
            assert shared == brute_force(entries, prompt, limit, exclude)
            if shared:
                assert slot != exclude and common_prefix(prompt, rows[slot], limit) == shared
            else:
                assert slot == -1


def test_added_and_discarded_rows_are_found_or_not():
    rng = random.Random(1)
    entries: list[tuple[list[int], int]] = []
    index = PrefixIndex()
    for step in range(400):
        if entries and rng.random() < 0.4:
            tokens, slot = entries.pop(rng.randrange(len(entries)))
            index.discard(tokens, slot)
        else:
            row = random_rows(rng, 1) or [[0]]
            entries.append((row[0], step))
            index.add(row[0], step)
        assert len(index) == len(entries)
        prompt = random_rows(rng, 1) or [[1]]
        assert index.longest(prompt[0], 100)[0] == brute_force(entries, prompt[0], 100)


def test_identical_rows_each_stay_until_discarded():
    index = PrefixIndex([([1, 2, 3], 0), ([1, 2, 3], 1)])
    index.discard([1, 2, 3], 0)
    assert index.longest([1, 2, 3, 4], 10) == (3, 1)
    index.discard([1, 2, 3], 0)  # gone already: nothing changes
    assert len(index) == 1
    index.discard([1, 2, 3], 1)
    assert index.longest([1, 2, 3, 4], 10) == (0, -1)
