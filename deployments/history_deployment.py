"""Ray Serve shell around `HistoryStore`: the single owner of the SQLite file. It runs with
exactly one replica; every other deployment reaches history through its handle, calling the
store's own methods (`history.get_conversation.remote(id)`)."""

from __future__ import annotations

from pathlib import Path

from ray import serve

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

    def ready(self) -> None:
        """Does nothing: a caller's early first call sets up its way to this replica (see Ingress)."""
