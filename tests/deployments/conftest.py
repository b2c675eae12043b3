"""The history store the deployments' tests drive: a real SQLite file in a test's own directory."""

from __future__ import annotations

import pytest

from deployments.history_store import HistoryStore


@pytest.fixture
async def store(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite3")
    await store.open()
    yield store
    await store.close()
