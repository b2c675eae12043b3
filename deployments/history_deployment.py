"""Ray Serve shell around `HistoryStore`: the single owner of the SQLite file. It runs with
exactly one replica; the ingress replicas call the store's own methods on it, on a connection
beside Serve (`deployments.call_channel`) or through its handle
(`history.get_conversation.remote(id)`)."""

from __future__ import annotations

from pathlib import Path

import ray
from ray import serve

from deployments.call_channel import CallServer
from deployments.history_store import HistoryStore
from deployments.logs import show_our_logs
from deployments.quotas import Quotas


@serve.deployment(num_replicas=1)
class HistoryDeployment(HistoryStore):
    # Serve awaits async constructors; mypy holds every `__init__` to returning None.
    async def __init__(self, database_path: Path, owner_of_unowned: str | None = None, quotas: Quotas | None = None):  # type: ignore[misc]
        show_our_logs()
        super().__init__(database_path, quotas)
        # Opened here, on the replica's event loop, because aiosqlite binds to that loop.
        await self.open()
        # With users (`auth: users`), conversations made without them get their owner.
        if owner_of_unowned is not None:
            await self.adopt_unowned(owner_of_unowned)
        # On the node's address, where ingress replicas on any node reach it.
        self.channel = CallServer(self, "history")
        await self.channel.start(ray.util.get_node_ip_address())

    def address(self) -> tuple[str, int, str] | None:
        """Where callers reach this replica beside Serve (`CallClient`); None once stopping."""
        return self.channel.address()

    async def __del__(self) -> None:
        # Serve's graceful shutdown awaits it: the callers on the channel make their next
        # calls through Serve, and the calls they made are answered, before the replica goes.
        await self.channel.stop()
