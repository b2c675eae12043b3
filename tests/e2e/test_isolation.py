"""One request must never hurt another, against the real app: malformed and out-of-range
requests get their 4xx while a long answer streams on, byte for byte as it streams alone; a
second answer for a conversation that is still answering gets 409; a model replica killed in
the middle of answers ends every stream cleanly, with the reason, and the model serves again."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow

TINY = "tiny-random"
SMOL = "SmolLM2-135M-Instruct"
# Nearly the tiny model's whole context (512 tokens, the prompt ~40 of them): the longest stream it gives.
LONG_GREEDY = {"prompt": "Tell me everything.", "model": TINY, "sample_len": 440, "temperature": 0, "repeat_penalty": 1.0}
JSON = {"content-type": "application/json"}

# Each poison request, and the status it must get.
POISON = [
    (
        "/v1/chat/completions",
        json.dumps({"model": TINY, "messages": [{"role": "user", "content": "x"}], "top_k": 92081372754769103375368022717890560}),
        JSON,
        400,
    ),
    ("/v1/completions", json.dumps({"model": TINY, "prompt": ""}), JSON, 400),
    ("/v1/completions", json.dumps({"model": TINY, "prompt": [""]}), JSON, 400),
    ("/v1/completions", '{"model": "tiny-random", "prompt": "x", "temperature": NaN}', JSON, 400),
    ("/v1/completions", b'{"model": "tiny-random", "prompt": "\xff\xfe"}', JSON, 400),  # not UTF-8
    ("/v1/completions", json.dumps({"model": TINY, "prompt": "x"}), {"content-type": "text/plain"}, 400),
    ("/v1/completions", json.dumps({"model": TINY, "prompt": "x" * 1_000_000}), JSON, 400),  # 1 MB: beyond the context
    ("/conversations/1/generate", json.dumps({"prompt": "x", "top_p": 0}), JSON, 422),
    ("/conversations/1/generate", json.dumps({"prompt": "x", "sample_len": 2**70}), JSON, 422),
]


def stream_text(url: str, conversation_id: int, body: dict, on_chunk=None) -> str:
    received = b""
    with httpx.stream("POST", f"{url}/conversations/{conversation_id}/generate", json=body, timeout=300) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
            if on_chunk is not None:
                on_chunk(received)
    return received.decode()


def test_poison_requests_get_their_4xx_and_a_running_stream_streams_on_unchanged(serve_app):
    url = serve_app.url
    alone = stream_text(url, httpx.get(f"{url}/conversations/start").json(), LONG_GREEDY)
    answers: list[tuple[int, int]] = []
    sent = False

    def send_poison(received: bytes) -> None:
        nonlocal sent
        if sent or len(received) < 100:
            return
        sent = True  # once, in the middle of the stream
        for path, body, headers, expected in POISON:
            answers.append((httpx.post(f"{url}{path}", content=body, headers=headers, timeout=120).status_code, expected))

    together = stream_text(url, httpx.get(f"{url}/conversations/start").json(), LONG_GREEDY, send_poison)
    assert sent, "the stream ended before the poison was sent"
    assert [status for status, _ in answers] == [expected for _, expected in answers]
    assert together == alone


def test_a_second_answer_while_the_first_streams_is_refused_with_409_by_every_ingress_replica(serve_app):
    """The app runs two ingress replicas; Serve's router sends a request to the less busy of
    them, here mostly the one not relaying the stream, so the refusals cover both."""
    url = serve_app.url
    conversation_id = httpx.get(f"{url}/conversations/start").json()
    refusals = []

    def ask(path: str) -> httpx.Response:
        body = {"prompt": "again"} if path == "generate" else {}
        return httpx.post(f"{url}/conversations/{conversation_id}/{path}", json=body, timeout=60)

    def ask_again(received: bytes) -> None:
        if not refusals:
            with ThreadPoolExecutor(8) as pool:
                refusals.extend(pool.map(ask, ["generate"] * 6 + ["regenerate"] * 2))

    stream_text(url, conversation_id, {**LONG_GREEDY, "sample_len": 200}, ask_again)
    assert [r.status_code for r in refusals] == [409] * 8
    assert all(r.json()["detail"].startswith(f"conversation '{conversation_id}' is already answering") for r in refusals)
    stored = httpx.get(f"{url}/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    # Once the answer is done, the conversation takes the next prompt.
    assert httpx.post(f"{url}/conversations/{conversation_id}/generate", json={**LONG_GREEDY, "sample_len": 5}).status_code == 200


def openai_stream_events(url: str, body: dict, on_event) -> list[str]:
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                on_event(events)
    return events


def kill_replica_of(deployment: str) -> None:
    """SIGKILL for the deployment's replica process, as a crash or the OOM killer would do it
    (Serve then starts another)."""
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    replica = ray.get_actor(name, namespace="serve")
    os.kill(ray.get(replica.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)


def test_a_replica_killed_mid_answer_ends_every_stream_cleanly_and_the_model_recovers(serve_app, report):
    """Four streams on the replica (two per API) and one on another model when it is killed."""
    url = serve_app.url
    conversation_ids = [httpx.get(f"{url}/conversations/start").json() for _ in range(2)]
    chat = {
        "model": TINY,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "stream": True,
        "max_tokens": 440,
        "temperature": 0,
    }
    smol = {"prompt": "Count from one to twenty.", "model": SMOL, "sample_len": 48, "temperature": 0}
    progress: dict[str, int] = {}
    with ThreadPoolExecutor(5) as pool:
        texts = [
            pool.submit(stream_text, url, conversation_id, LONG_GREEDY, lambda r, i=i: progress.update({f"text{i}": len(r)}))
            for i, conversation_id in enumerate(conversation_ids)
        ]
        events = [
            pool.submit(openai_stream_events, url, chat, lambda e, i=i: progress.update({f"events{i}": len(e)})) for i in range(2)
        ]
        other_model = pool.submit(stream_text, url, httpx.get(f"{url}/conversations/start").json(), smol)
        deadline = time.monotonic() + 60
        # A few pieces each, not many: at a CPU stream's 20 chunks a second the tiny model's
        # answers could be over before ten events came.
        while len(progress) < 4 or min(progress.values()) < 4:
            assert time.monotonic() < deadline, f"the streams did not start: {progress}"
            time.sleep(0.05)
        kill_replica_of(f"LLM-{TINY}")
        killed_at = time.monotonic()
        texts, events, other_model = [t.result() for t in texts], [e.result() for e in events], other_model.result()

    # The original API's stream ends with the error line; the OpenAI stream with an error event, then [DONE].
    for stream in events:
        assert json.loads(stream[-2])["error"]["message"].startswith("the model's replica stopped while answering")
        assert stream[-1] == "[DONE]"
    # Another model's stream did not notice.
    assert "[error]" not in other_model and other_model.strip()
    for conversation_id, text in zip(conversation_ids, texts):
        answer, _, error_line = text.rpartition("\n[error] ")
        assert error_line.startswith("the model's replica stopped while answering") and error_line.endswith("\n")
        # History: the interrupted answer, as far as it got, marked failed with the reason in words.
        deadline = time.monotonic() + 10
        while len(stored := httpx.get(f"{url}/conversations/{conversation_id}").json()["messages"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (stored[1]["status"], stored[1]["content"]) == ("failed", answer)
        assert stored[1]["error"].startswith("the model's replica stopped while answering")
    # Serve starts a new replica; the model answers again.
    while (
        httpx.post(f"{url}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 4}, timeout=60).status_code != 200
    ):
        assert time.monotonic() - killed_at < 120, "the model did not recover within 2 minutes"
        time.sleep(0.5)
    report(f"recovered {time.monotonic() - killed_at:.1f} s after the kill")
