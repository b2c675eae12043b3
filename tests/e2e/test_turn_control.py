"""Stopping, disconnecting and regenerating, against the real app: what the replica does (its
active-stream count) and what history keeps."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import metric_by_replica

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
LONG = {"prompt": "Write a very long story about a dragon and a knight.", "sample_len": 400, "seed": 7, "temperature": 0.8}


@pytest.fixture
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        yield client


def metric(client: httpx.Client, name: str, **labels) -> float:
    """The sum of `name`'s series with these labels over the ingress replicas, as a Prometheus
    query would sum them."""
    return sum(metric_by_replica(client, name, **labels).values())


def messages(client: httpx.Client, conversation_id: int) -> list[dict]:
    return client.get(f"/conversations/{conversation_id}").json()["messages"]


def test_stop_ends_the_stream_cleanly_and_keeps_the_partial_answer(client):
    conversation_id = client.get("/conversations/start").json()
    received = b""
    with httpx.Client(base_url=client.base_url, timeout=30) as other:
        with client.stream("POST", f"/conversations/{conversation_id}/generate", json=LONG) as response:
            stream = response.iter_raw()
            while len(received) < 30:
                received += next(stream)
            stop = other.post(f"/conversations/{conversation_id}/stop")
            assert stop.json() == {"id": conversation_id, "stopped": True}
            stopped_at = time.monotonic()
            received += b"".join(stream)  # the stream ends normally, soon
            assert time.monotonic() - stopped_at < 2
    user, answer = messages(client, conversation_id)
    assert (answer["status"], answer["content"]) == ("stopped", received.decode())
    assert answer["completion_tokens"] < 200
    assert client.post(f"/conversations/{conversation_id}/stop").json()["stopped"] is False
    assert client.post("/conversations/999999/stop").status_code == 404


def test_a_disconnect_frees_the_replica_within_a_second(client):
    conversation_id = client.get("/conversations/start").json()
    stopped_before = metric(client, "chat_turns_total", model=SMOL, status="stopped")
    with client.stream("POST", f"/conversations/{conversation_id}/generate", json=LONG) as response:
        # Held until the disconnect: a dropped iterator closes the response when it is collected,
        # and the answer was then stopped after its first chunk, before a scrape could see it.
        stream = response.iter_raw()
        next(stream)
        # The gauge is read from the replica at scrape time; give a busy machine a moment.
        deadline = time.monotonic() + 5
        while metric(client, "chat_active_streams", model=SMOL) != 1:
            assert time.monotonic() < deadline, "the replica does not report the stream as active"
            time.sleep(0.1)
    disconnected_at = time.monotonic()
    while metric(client, "chat_active_streams", model=SMOL) != 0:
        assert time.monotonic() - disconnected_at < 1.0, "the replica still decodes for a gone client"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while len(messages(client, conversation_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert messages(client, conversation_id)[1]["status"] == "stopped"
    assert metric(client, "chat_turns_total", model=SMOL, status="stopped") == stopped_before + 1
    assert metric(client, "chat_time_to_first_token_seconds_count", model=SMOL) >= 1


def test_regenerate_replaces_the_last_answer_with_other_parameters(client):
    conversation_id = client.get("/conversations/start").json()
    first = client.post(
        f"/conversations/{conversation_id}/generate",
        json={"prompt": "hello", "model": "tiny-random", "sample_len": 12, "seed": 1, "temperature": 1},
    ).text
    again = client.post(
        f"/conversations/{conversation_id}/regenerate",
        json={"model": "tiny-random", "sample_len": 12, "seed": 2, "temperature": 1},
    )
    assert again.status_code == 200
    stored = messages(client, conversation_id)
    assert [(m["role"], m["content"]) for m in stored] == [("user", "hello"), ("assistant", again.text)]
    assert again.text != first
    assert stored[1]["parameters"]["seed"] == 2


def test_regenerate_needs_a_prompt(client):
    conversation_id = client.get("/conversations/start").json()
    response = client.post(f"/conversations/{conversation_id}/regenerate")
    assert response.status_code == 400
    assert response.json()["detail"] == f"conversation '{conversation_id}' has no prompt to answer again"


def test_a_full_queue_is_refused_with_503_and_retry_after(serve_app, report):
    """tiny-narrow takes one request at a time and queues one more: of ten sent at once, the
    overflow is refused at once with 503 + Retry-After, the rest are served; none hangs or 500s."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "tiny-narrow", "prompt": "go", "max_tokens": 450, "min_tokens": 450, "ignore_eos": True}

    def send(_):
        sent = time.monotonic()
        response = httpx.post(f"{serve_app.url}/v1/completions", json=body, timeout=120)
        return response.status_code, response.headers.get("retry-after"), response.json(), time.monotonic() - sent

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(send, range(10)))
    statuses = [status for status, _, _, _ in results]
    assert set(statuses) == {200, 503}, statuses
    for status, retry_after, answer, seconds in results:
        if status == 503:
            assert retry_after == "2"
            assert (
                answer["error"]["message"] == "model 'tiny-narrow' is overloaded (all replicas busy, queue full); retry shortly"
            )
            assert seconds < 1.0, f"refused after {seconds:.2f} s"
        else:
            assert answer["usage"]["completion_tokens"] == 450
    refused = [seconds for status, _, _, seconds in results if status == 503]
    report(
        f"overload: {len(results) - len(refused)} of {len(results)} served, {len(refused)} refused with 503 "
        f"in at most {max(refused):.2f} s"
    )
