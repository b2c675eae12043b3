"""Runs the Locust load test briefly against the real app and checks it reports TTFT and ITL."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow


def test_locust_reports_time_to_first_token_and_inter_token_latency(serve_app, tmp_path):
    env = {**os.environ, "LOAD_SAMPLE_LEN": "24"}  # the default model: real text, real chunks
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO_ROOT / "loadtests" / "locustfile.py"),
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "10s",
            "--stop-timeout",
            "90",
            "--host",
            serve_app.url,
            "--csv",
            str(tmp_path / "run"),
            "--only-summary",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    generate = rows[("POST", "/conversations/[id]/generate")]
    assert int(generate["Request Count"]) >= 2 and int(generate["Failure Count"]) == 0
    ttft, itl = rows[("STREAM", "TTFT")], rows[("STREAM", "ITL")]
    # Every answer has one TTFT; a user stopped at the time limit may have a TTFT and no answer.
    assert int(generate["Request Count"]) <= int(ttft["Request Count"]) <= int(generate["Request Count"]) + 2
    assert int(itl["Request Count"]) > int(ttft["Request Count"])  # several chunks per answer
    assert 0 < float(ttft["Median Response Time"]) < 30_000
