"""The environment the benchmarks and load tests start the service in (`serve_environment`)."""

from __future__ import annotations

import os

import pytest

from loadtests.service import REPO_ROOT, serve_environment


def test_the_repository_comes_first_on_pythonpath_and_what_was_there_stays(monkeypatch: pytest.MonkeyPatch):
    # Ray installed with `pip --target /tmp/site` is found only through PYTHONPATH (bench/gpu_check.sh).
    monkeypatch.setenv("PYTHONPATH", f"/tmp/site{os.pathsep}/opt/other")
    assert serve_environment()["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/tmp/site", "/opt/other"]


def test_without_pythonpath_it_is_the_repository_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert serve_environment()["PYTHONPATH"] == str(REPO_ROOT)


def test_serve_env_applies_over_the_callers_and_the_front_and_extras_over_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    env = serve_environment("python", RAY_CHAT_AUTH="users")
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"  # serve.env's
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the front asked for
    assert env["RAY_CHAT_AUTH"] == "users"
    assert "RAY_ADDRESS" not in env  # a cluster of its own, not the caller's
    assert serve_environment("haproxy")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
