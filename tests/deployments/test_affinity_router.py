from __future__ import annotations

from collections import Counter

from deployments.affinity_router import rendezvous_order

REPLICAS = [f"replica-{i}" for i in range(4)]
KEYS = [f"conversation-{i}" for i in range(2000)]


def test_every_router_ranks_the_replicas_of_a_key_alike_whatever_their_order():
    for key in KEYS[:50]:
        assert rendezvous_order(key, REPLICAS) == rendezvous_order(key, list(reversed(REPLICAS)))
        assert sorted(rendezvous_order(key, REPLICAS)) == sorted(REPLICAS)


def test_keys_spread_evenly_over_the_replicas():
    first = Counter(rendezvous_order(key, REPLICAS)[0] for key in KEYS)
    assert set(first) == set(REPLICAS)
    assert all(abs(count - len(KEYS) / 4) < 0.1 * len(KEYS) / 4 * 3 for count in first.values()), first


def test_a_new_replica_takes_only_its_share_and_a_gone_one_moves_only_its_own_keys():
    before = {key: rendezvous_order(key, REPLICAS)[0] for key in KEYS}
    grown = {key: rendezvous_order(key, [*REPLICAS, "replica-new"])[0] for key in KEYS}
    moved = [key for key in KEYS if grown[key] != before[key]]
    assert all(grown[key] == "replica-new" for key in moved)
    assert 0.1 < len(moved) / len(KEYS) < 0.3  # about 1/5
    shrunk = {key: rendezvous_order(key, REPLICAS[1:])[0] for key in KEYS}
    assert [key for key in KEYS if shrunk[key] != before[key]] == [key for key in KEYS if before[key] == "replica-0"]
    # A key whose replica is gone goes to its second choice: still the same for every router.
    assert all(shrunk[key] == rendezvous_order(key, REPLICAS)[1] for key in KEYS if before[key] == "replica-0")
