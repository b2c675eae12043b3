"""Which `serve` the launcher runs (stopping it: tests/operations/test_launcher.py)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from serve_app.launcher import serve_command


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A virtual environment's interpreter, as the launcher sees `sys.executable`."""
    python = executable(tmp_path / "venv" / "bin" / "python")
    monkeypatch.setattr(sys, "executable", str(python))
    return python


def test_the_serve_beside_the_interpreter_comes_first(interpreter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    beside = executable(interpreter.with_name("serve"))
    monkeypatch.setenv("PATH", str(executable(tmp_path / "elsewhere" / "serve").parent))
    assert serve_command() == str(beside)


def test_without_one_beside_the_interpreter_the_one_on_path_runs(
    interpreter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Ray installed with `pip install --target DIR`: its scripts in DIR/bin, on PATH (bench/gpu_check.sh).
    on_path = executable(tmp_path / "site" / "bin" / "serve")
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}:{on_path.parent}")
    assert serve_command() == str(on_path)


def test_no_serve_anywhere_is_an_error_that_says_what_to_install(
    interpreter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        SystemExit, match=r"`serve` command is neither beside .*venv/bin/python nor on PATH: install ray\[serve\]"
    ):
        serve_command()
