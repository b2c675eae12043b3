"""Conversation-affine routing between the replicas of one model deployment.

A replica's prefix cache holds a conversation's earlier turns only if the next turn reaches the
same replica. Serve's default router picks the less busy of two random replicas, so with two
replicas half of all next turns recompute their whole history. This router sends every request
that carries an `affinity_key` (the ingress sets it: the conversation, or the opening of a
stateless chat) to the replica that key hashes to, by rendezvous hashing: every ingress replica
computes the same choice with no shared state, and when replicas come or go only the keys of
those replicas move. It falls back to the least loaded other replica when the preferred one is
full, gone, or busier than the least busy replica by `imbalance_threshold` requests (the idea
of Ray Serve LLM's prefix-cache affinity router, with a key instead of a prefix tree).

Serve runs the router in each process that holds a handle to the deployment (the ingress); the
application builder (`serve_app/app.py`) selects it with the deployment's `request_router_config`.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deployments.engine.protocol import GenerationRequest


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` from most to least preferred for `key` (highest random weight first)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class ConversationAffinityRouter(FIFOMixin, RequestRouter):
    # Serve calls this with the config's `request_router_kwargs`; the base class declares
    # `**kwargs` for any router's own keywords, which mypy reads as an override that must take any.
    def initialize_state(self, imbalance_threshold: int = 8) -> None:  # type: ignore[override]
        self.imbalance_threshold = imbalance_threshold

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = _affinity_key(pending_request)
        if key is None or len(candidate_replicas) == 1:
            # Stats, cancel, and requests with no key: the less busy of two random replicas.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        preferred, *others = (by_id[replica_id] for replica_id in rendezvous_order(key, list(by_id)))
        if self._queue_len(preferred) - min(self._queue_len(r) for r in others) >= self.imbalance_threshold:
            return [others]
        # Serve tries the first rank, then the next: the preferred replica unless its queue is
        # full, else the least loaded of the rest.
        return [[preferred], others]

    def _queue_len(self, replica: RunningReplica) -> int:
        """The replica's ongoing requests as last probed (0 when not known or stale)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0


def _affinity_key(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request.affinity_key if isinstance(request, GenerationRequest) else None
