"""`make user`: users and their API keys for `auth: users`, on the history database itself, so it
works whether the service runs or not (SQLite's WAL lets it write beside the history replica,
which looks every key up per request: a revoked key is refused at once).

    python -m serve_app.users add alice [--admin]   # prints alice's new key as its last line
    python -m serve_app.users list                  # users, and keys by their first characters
    python -m serve_app.users revoke rc-AbCdEfG     # a key, by what `list` shows of it
    python -m serve_app.users rotate alice          # revokes alice's keys, prints a new one

`--database` defaults to serve_config.yaml's `database_path`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no stubs installed; one safe_load here

from deployments.history_store import HistoryStore
from deployments.user_accounts import UserError
from serve_app.settings import AppSettings

CONFIG = Path("serve_config.yaml")


def configured_database(config: Path = CONFIG) -> Path:
    """The database the service in `config` uses (relative to where it is run, as Serve resolves it)."""
    args: dict[str, Any] = {}
    if config.is_file():
        applications = yaml.safe_load(config.read_text()).get("applications", [])
        args = applications[0].get("args", {}) if applications else {}
    return Path(args.get("database_path", AppSettings.model_fields["database_path"].default))


async def run(args: argparse.Namespace) -> list[str]:
    store = HistoryStore(args.database)
    await store.open()
    try:
        if args.command == "add":
            user, key = await store.add_user(args.name, admin=args.admin)
            return [f"user '{user.name}' added{' (admin)' if user.admin else ''}; its key (shown only now):", key]
        if args.command == "rotate":
            key = await store.rotate_key(args.name)
            return [f"every key of '{args.name}' revoked; the new one (shown only now):", key]
        if args.command == "revoke":
            count = await store.revoke_key(args.prefix)
            return [f"{count} key(s) revoked"]
        users, keys = await store.list_users(), await store.list_keys()
        lines = [f"{u.name}{' (admin)' if u.admin else ''}" for u in users]
        lines += [
            f"  {k.prefix}…  {k.user}  created {k.created_at:%Y-%m-%d %H:%M}" + (" revoked" if k.revoked_at else "") for k in keys
        ]
        return lines or ["no users yet"]
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.users", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", type=Path, default=None, help="default: serve_config.yaml's database_path")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="a new user and its first key")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may list every user's conversations")
    commands.add_parser("list", help="users and their keys (first characters only)")
    revoke = commands.add_parser("revoke", help="revoke a key by its first characters")
    revoke.add_argument("prefix")
    rotate = commands.add_parser("rotate", help="revoke a user's keys and print a new one")
    rotate.add_argument("name")
    args = parser.parse_args(argv)
    args.database = args.database or configured_database()
    try:
        lines = asyncio.run(run(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
