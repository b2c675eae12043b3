"""The whole service killed with SIGKILL while users write, then started again on the same
database, as `make serve` runs it (`serve run`, which starts Ray under it): every turn whose
stream the client saw end is there, whole, after the restart. A turn's stream ends only after
its answer is committed, so "acknowledged" means "stored"."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import free_port, own_ports, wait_ready, write_serve_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = {"name": "tiny-random", "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}


def start_service(directory: Path, port: int) -> subprocess.Popen:
    config = write_serve_config(directory, port, {"database_path": "history.sqlite3", "models": [MODEL]})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | own_ports()
    log = directory / "serve.log"
    service = subprocess.Popen(
        [BIN / "serve", "run", "--address", "local", config.name],
        cwd=directory,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_ready(f"http://127.0.0.1:{port}", service, log, timeout_s=300)
    return service


def kill_everything(service: subprocess.Popen) -> None:
    """SIGKILL for `serve run` and every process it started (Ray's GCS, raylet, replicas, the
    HAProxy front) at once: every process of its session, orphans included."""
    processes = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == service.pid:
                process.send_signal(signal.SIGKILL)
                processes.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    psutil.wait_procs(processes, timeout=30)


async def write_until_killed(url: str, service: subprocess.Popen, acknowledged: list[tuple[int, str, str]]) -> int:
    """Four users each run turns (one conversation each, new turns appended) until the service is
    killed, after 30 acknowledged turns; returns the number of turns cut by the kill."""
    cut = 0

    async def user(index: int, http: httpx.AsyncClient) -> None:
        nonlocal cut
        conversation_id = (await http.get("/conversations/start")).json()
        for turn in range(10_000):
            prompt = f"user {index} turn {turn}"
            body = {"prompt": prompt, "model": MODEL["name"], "sample_len": 6, "temperature": 0}
            try:
                async with http.stream("POST", f"/conversations/{conversation_id}/generate", json=body) as response:
                    answer = (await response.aread()).decode()
                    assert response.status_code == 200, answer
            except httpx.HTTPError:
                cut += 1
                return
            acknowledged.append((conversation_id, prompt, answer))

    async def killer() -> None:
        while len(acknowledged) < 30:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(kill_everything, service)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(killer(), *(user(i, http) for i in range(4)))
    return cut


def test_every_acknowledged_turn_survives_a_kill_9_of_the_whole_service(report):
    directory = Path(tempfile.mkdtemp(prefix="kill-", dir="/tmp"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start_service(directory, port)
    acknowledged: list[tuple[int, str, str]] = []
    try:
        cut = asyncio.run(write_until_killed(url, service, acknowledged))
        assert cut == 4  # every user was mid-turn or about to send when the service died
        service = start_service(directory, port)
        stored: dict[int, list[dict]] = {}
        for conversation_id, _, _ in acknowledged:
            if conversation_id not in stored:
                response = httpx.get(f"{url}/conversations/{conversation_id}", timeout=30)
                assert response.status_code == 200, (response.text, (directory / "serve.log").read_text()[-3000:])
                stored[conversation_id] = response.json()["messages"]
        lost = [
            (conversation_id, prompt)
            for conversation_id, prompt, answer in acknowledged
            if not any(
                m["content"] == prompt
                and i + 1 < len(messages)
                and messages[i + 1]["content"] == answer
                and messages[i + 1]["status"] == "complete"
                for messages in [stored[conversation_id]]
                for i, m in enumerate(messages)
            )
        ]
        report(
            f"kill -9 of the whole service: {len(acknowledged)} acknowledged turns, {len(acknowledged) - len(lost)} "
            f"stored after the restart, {cut} turns cut by the kill"
        )
        assert len(acknowledged) >= 30 and lost == []
        # The restarted service answers and appends after what survived.
        conversation_id = acknowledged[0][0]
        body = {"prompt": "still there?", "model": MODEL["name"], "sample_len": 4}
        assert httpx.post(f"{url}/conversations/{conversation_id}/generate", json=body, timeout=60).status_code == 200
    finally:
        kill_everything(service)
        shutil.rmtree(directory, ignore_errors=True)
