"""`make user`'s CLI on a real history database: the key it prints last is the user's."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from deployments.history_store import HistoryStore
from deployments.user_accounts import key_hash
from serve_app.users import configured_database, main
from tests.support import REPO_ROOT


def user_of(database, key: str):
    async def look_up():
        store = HistoryStore(database)
        await store.open()
        try:
            return await store.authenticate(key_hash(key))
        finally:
            await store.close()

    return asyncio.run(look_up())


def test_make_user_prints_a_key_last_that_names_the_user(tmp_path):
    database = tmp_path / "history.sqlite3"
    made = subprocess.run(
        [sys.executable, "-m", "serve_app.users", "--database", str(database), "add", "alice", "--admin"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    key = made.stdout.strip().splitlines()[-1]
    alice = user_of(database, key)
    assert alice is not None and alice.name == "alice" and alice.admin


def test_list_shows_only_prefixes_and_rotate_and_revoke_end_keys(tmp_path, capsys):
    database = str(tmp_path / "history.sqlite3")
    assert main(["--database", database, "add", "bob"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["--database", database, "rotate", "bob"]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert user_of(database, first) is None and user_of(database, second).name == "bob"
    assert main(["--database", database, "list"]) == 0
    listing = capsys.readouterr().out
    assert first[:10] in listing and second[:10] in listing and second not in listing and "revoked" in listing
    assert main(["--database", database, "revoke", second[:10]]) == 0
    assert user_of(database, second) is None
    assert main(["--database", database, "add", "bob"]) == 1
    assert "exists already" in capsys.readouterr().err


def test_the_default_database_is_serve_configs(tmp_path):
    config = tmp_path / "serve_config.yaml"
    config.write_text("applications:\n- name: chat\n  args:\n    database_path: somewhere/h.sqlite3\n")
    assert str(configured_database(config)) == "somewhere/h.sqlite3"
    assert str(configured_database(tmp_path / "missing.yaml")) == "data/history.sqlite3"
