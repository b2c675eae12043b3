"""History lives in the SQLite file, not in any replica: it survives redeploying the app."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow


def test_history_survives_an_application_restart(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        conversation_id = client.get("/conversations/start").json()
        body = {"prompt": "Remember me", "model": "tiny-random", "sample_len": 6, "seed": 3}
        answer = client.post(f"/conversations/{conversation_id}/generate", json=body).text
        before = client.get(f"/conversations/{conversation_id}").json()
        assert [m["content"] for m in before["messages"]] == ["Remember me", answer]

    serve_app.restart()

    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        assert client.get(f"/conversations/{conversation_id}").json() == before
        assert conversation_id in client.get("/conversations").json()
        # New conversations never reuse an old id.
        assert client.get("/conversations/start").json() > conversation_id


def history_replicas() -> list[psutil.Process]:
    """The history replica's process (Ray titles it `ray::ServeReplica:<app>:HistoryDeployment`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica") and "HistoryDeployment" in title:
            found.append(process)
    return found


def test_a_killed_history_replica_is_replaced_and_the_history_reached_again(serve_app, report):
    """SIGKILL of the history replica: Serve starts another on the same file; meanwhile requests
    that need the history are answered 503 (never a 500 or a hang), and afterwards every stored
    turn is there and new turns are stored (the ingress replicas' channels to it reopened)."""
    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        conversation_id = client.get("/conversations/start").json()
        body = {"model": "tiny-random", "sample_len": 6, "seed": 3}
        first = client.post(f"/conversations/{conversation_id}/generate", json={**body, "prompt": "Before"}).text
        (killed,) = history_replicas()
        killed.kill()
        killed.wait(30)
        killed_at = time.monotonic()

        statuses: list[int] = []
        deadline = time.monotonic() + 120
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses
            statuses.append(client.get(f"/conversations/{conversation_id}").status_code)
            time.sleep(0.2)
        report(f"history replica killed: reached again after {time.monotonic() - killed_at:.1f} s; statuses {statuses}")
        assert set(statuses) <= {200, 503}, statuses
        (replacement,) = history_replicas()
        assert replacement.pid != killed.pid

        # New turns, through either ingress replica, are stored after the ones before the kill.
        for turn in range(4):
            response = client.post(f"/conversations/{conversation_id}/generate", json={**body, "prompt": f"After {turn}"})
            assert response.status_code == 200, response.text
        messages = client.get(f"/conversations/{conversation_id}").json()["messages"]
        assert [m["content"] for m in messages[:2]] == ["Before", first]
        assert [m["content"] for m in messages[2::2]] == [f"After {turn}" for turn in range(4)]
        assert all(m["status"] == "complete" for m in messages)
