"""Runs the Locust load test briefly against the real app and checks it reports TTFT and ITL."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import httpx
import pytest

from loadtests.service import free_port, running_service
from tests.support import REPO_ROOT, users_cli

pytestmark = pytest.mark.slow


def run_locust(url: str, directory, users: int, env: dict[str, str]) -> dict[tuple[str, str], dict]:
    """A headless Locust run of 10 s against `url`; its stats by (type, name)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO_ROOT / "loadtests" / "locustfile.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            "10s",
            "--stop-timeout",
            "90",
            "--host",
            url,
            "--csv",
            str(directory / "run"),
            "--only-summary",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(directory / "run_stats.csv") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_reports_time_to_first_token_and_inter_token_latency(serve_app, tmp_path):
    # The default model: real text, real chunks.
    rows = run_locust(serve_app.url, tmp_path, 2, {"LOAD_SAMPLE_LEN": "24"})
    generate = rows[("POST", "/conversations/[id]/generate")]
    assert int(generate["Request Count"]) >= 2 and int(generate["Failure Count"]) == 0
    ttft, itl = rows[("STREAM", "TTFT")], rows[("STREAM", "ITL")]
    # Every answer has one TTFT; a user stopped at the time limit may have a TTFT and no answer.
    assert int(generate["Request Count"]) <= int(ttft["Request Count"]) <= int(generate["Request Count"]) + 2
    assert int(itl["Request Count"]) > int(ttft["Request Count"])  # several chunks per answer
    assert 0 < float(ttft["Median Response Time"]) < 30_000


def test_locust_runs_as_many_users_with_their_own_keys_and_counts_429_apart(tmp_path):
    """`auth: users`, two people's keys shared by four simulated users; one person may start two
    generations a minute: their refusals are a row of their own, not failures."""
    models = [{"name": "tiny-random", "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}]
    quotas = {"users": {"limited": {"requests_per_minute": 2}}}
    with running_service(models, free_port(), app_args={"quotas": quotas}, env={"RAY_CHAT_AUTH": "users"}) as service:
        keys = [users_cli(service.database, "add", name) for name in ("limited", "free")]
        (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
        env = {"LOAD_KEYS": str(tmp_path / "keys.txt"), "LOAD_MODEL": "tiny-random", "LOAD_SAMPLE_LEN": "8"}
        rows = run_locust(service.url, tmp_path, 4, env)
        admin = httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {users_cli(service.database, 'rotate', 'admin')}"}
        )
        usage = {row["user"]: row for row in admin.get("/v1/usage?all=true").json()["data"]}
    generate, limited = rows[("POST", "/conversations/[id]/generate")], rows[("POST", "(429) /conversations/[id]/generate")]
    assert int(generate["Failure Count"]) == 0 and int(limited["Failure Count"]) == 0
    assert int(limited["Request Count"]) >= 1
    assert usage["limited"]["requests"] == 2  # its limit; each of its users got its share of 429s
    assert usage["free"]["requests"] >= 2 and usage["free"]["requests"] + 2 == int(generate["Request Count"])
