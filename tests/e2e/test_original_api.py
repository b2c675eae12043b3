"""The original HTTP API against the real Serve application (real Ray, SQLite file, SmolLM2)."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from tests.support import prompt_tokens_reused

pytestmark = pytest.mark.slow

CAPITAL_PROMPT = {"prompt": "What is the capital of France?", "temperature": 0, "sample_len": 48}


@pytest.fixture
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        yield client


def start(client: httpx.Client) -> int:
    response = client.get("/conversations/start")
    assert response.status_code == 200
    conversation_id = response.json()
    assert isinstance(conversation_id, int)
    return conversation_id


def stream_answer(client: httpx.Client, conversation_id: int, body: dict) -> list[bytes]:
    with client.stream("POST", f"/conversations/{conversation_id}/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/plain")
        return [chunk for chunk in response.iter_raw() if chunk]


def stored_rows(serve_app, conversation_id: int) -> list[tuple]:
    with sqlite3.connect(serve_app.database_path) as db:
        return db.execute(
            "SELECT role, content, model, status FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        ).fetchall()


def test_chat_round_trip_streams_stores_and_deletes(client, serve_app):
    conversation_id = start(client)
    assert conversation_id in client.get("/conversations").json()

    chunks = stream_answer(client, conversation_id, CAPITAL_PROMPT)
    answer = b"".join(chunks).decode()
    assert "Paris" in answer
    assert len(chunks) > 1, "the answer should arrive as a stream, not one block"

    history = client.get(f"/conversations/{conversation_id}").json()
    assert history["id"] == conversation_id
    assert history["title"] == "What is the capital of France?"
    user, assistant = history["messages"]
    assert (user["role"], user["content"]) == ("user", CAPITAL_PROMPT["prompt"])
    assert (assistant["role"], assistant["content"], assistant["status"]) == ("assistant", answer, "complete")
    assert assistant["model"] == "SmolLM2-135M-Instruct"
    assert assistant["parameters"]["temperature"] == 0
    assert assistant["parameters"]["sample_len"] == 48
    assert assistant["parameters"]["top_p"] == 0.9  # the default, filled in
    assert [row[:2] for row in stored_rows(serve_app, conversation_id)] == [
        ("user", CAPITAL_PROMPT["prompt"]),
        ("assistant", answer),
    ]

    response = client.delete(f"/conversations/{conversation_id}")
    assert response.status_code == 200
    assert response.json() == {"id": conversation_id, "deleted": True}
    response = client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]
    assert client.delete(f"/conversations/{conversation_id}").status_code == 404
    assert conversation_id not in client.get("/conversations").json()
    assert stored_rows(serve_app, conversation_id) == []


def test_later_turns_see_earlier_ones(client):
    greedy = {"temperature": 0, "sample_len": 32}
    conversation_id = start(client)
    stream_answer(client, conversation_id, {"prompt": "My name is Ada. Say hello to me.", **greedy})
    with_history = b"".join(stream_answer(client, conversation_id, {"prompt": "What is my name?", **greedy}))
    fresh_id = start(client)
    without_history = b"".join(stream_answer(client, fresh_id, {"prompt": "What is my name?", **greedy}))
    assert with_history != without_history

    first_answer, second_answer = [
        m for m in client.get(f"/conversations/{conversation_id}").json()["messages"] if m["role"] == "assistant"
    ]
    fresh_answer = client.get(f"/conversations/{fresh_id}").json()["messages"][1]
    # The second turn's prompt holds the whole first turn: its tokens and the answer's.
    assert second_answer["prompt_tokens"] >= fresh_answer["prompt_tokens"] + first_answer["completion_tokens"]
    assert first_answer["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("path_id", "body", "status", "message_part"),
    [
        (
            "{id}",
            {"prompt": "hi", "model": "no-such-model"},
            404,
            "available models: SmolLM2-135M-Instruct, tiny-random, tiny-narrow",
        ),
        ("999999", {"prompt": "hi"}, 404, "conversation '999999' not found"),
        ("not-a-number", {"prompt": "hi"}, 404, "conversation 'not-a-number' not found"),
        ("{id}", {"prompt": "hi", "temperature": -1}, 422, "greater than or equal to 0"),
        ("{id}", {"prompt": "hi", "top_p": 1.5}, 422, "less than or equal to 1"),
        ("{id}", {"temperature": 0.5}, 422, "Field required"),
        ("{id}", {"prompt": ""}, 422, "at least 1 character"),
        ("{id}", {"prompt": "hi", "revision": "v9"}, 404, "served at revision 'main'"),
        ("{id}", {"prompt": "hi", "sample_len": 4096}, 400, "context of 2048 tokens"),
    ],
)
def test_bad_generate_requests_get_clear_4xx_and_store_nothing(client, serve_app, path_id, body, status, message_part):
    conversation_id = start(client)
    response = client.post(f"/conversations/{path_id.format(id=conversation_id)}/generate", json=body)
    assert response.status_code == status, response.text
    assert message_part in str(response.json()["detail"])
    assert stored_rows(serve_app, conversation_id) == []


def test_non_json_body_is_400(client):
    conversation_id = start(client)
    response = client.post(
        f"/conversations/{conversation_id}/generate", content=b"prompt=hi", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "the request body is not valid JSON"}


def served_requests(client: httpx.Client) -> dict[str, float]:
    """Requests each model's replicas say they received (from their own engine stats)."""
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("chat_replica_requests{")]
    return {line.split('"')[1]: float(line.split()[-1]) for line in lines}


def test_the_next_turn_of_a_conversation_reuses_the_cached_prompt(client, serve_app):
    conversation_id = start(client)
    first = {"prompt": "Tell me about the sea, " + "waves " * 20, "model": "tiny-random", "sample_len": 8}
    b"".join(stream_answer(client, conversation_id, first))
    before = prompt_tokens_reused(client, "tiny-random")
    b"".join(stream_answer(client, conversation_id, {**first, "prompt": "and the sky?"}))
    # The second prompt starts with the whole first turn (byte-level tokenizer: ~170 tokens),
    # which the replica copies from its cache instead of computing again.
    assert prompt_tokens_reused(client, "tiny-random") - before >= 150


def test_second_model_is_routed_by_name(client, serve_app):
    conversation_id = start(client)
    before = served_requests(client)
    answer = b"".join(stream_answer(client, conversation_id, {"prompt": "hi", "model": "tiny-random", "sample_len": 8}))
    assert answer  # random weights: any text, but some
    assert stored_rows(serve_app, conversation_id)[-1][2] == "tiny-random"
    after = served_requests(client)
    assert after["tiny-random"] == before["tiny-random"] + 1
    assert after["SmolLM2-135M-Instruct"] == before["SmolLM2-135M-Instruct"]


def test_client_disconnect_keeps_the_partial_answer_as_stopped(client, serve_app):
    conversation_id = start(client)
    received = b""
    body = {"prompt": "Write a long story about a dragon.", "sample_len": 400, "seed": 1}
    with client.stream("POST", f"/conversations/{conversation_id}/generate", json=body) as response:
        for chunk in response.iter_raw():
            received += chunk
            if len(received) > 20:
                break  # closing the response drops the connection mid-answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(stored_rows(serve_app, conversation_id)) < 2:
        time.sleep(0.1)
    rows = stored_rows(serve_app, conversation_id)
    assert len(rows) == 2, f"the partial answer was not stored: {rows}"
    (_, prompt, _, _), (role, content, _, status) = rows
    assert (prompt, role, status) == (body["prompt"], "assistant", "stopped")
    assert content.startswith(received.decode(errors="ignore")[:10])
    assert len(content.split()) < 300  # stopped well before sample_len


def test_detail_listing_rename_and_export(client):
    conversation_id = start(client)
    stream_answer(client, conversation_id, {"prompt": "Say hi", "model": "tiny-random", "sample_len": 4})
    summaries = client.get("/conversations", params={"detail": "true"}).json()
    assert summaries[0]["id"] == conversation_id  # most recently active first
    assert summaries[0]["title"] == "Say hi"

    response = client.patch(f"/conversations/{conversation_id}", json={"title": "Greetings"})
    assert response.status_code == 200 and response.json()["title"] == "Greetings"
    assert client.patch(f"/conversations/{conversation_id}", json={"title": ""}).status_code == 422
    assert client.patch("/conversations/999999", json={"title": "x"}).status_code == 404

    exported = client.get(f"/conversations/{conversation_id}/export", params={"format": "markdown"})
    assert exported.headers["content-disposition"] == f'attachment; filename="conversation-{conversation_id}.md"'
    assert exported.text.startswith("# Greetings\n\n## User\n\nSay hi\n\n## Assistant (tiny-random)")
    as_json = client.get(f"/conversations/{conversation_id}/export").json()
    assert [m["role"] for m in as_json["messages"]] == ["user", "assistant"]


def test_page_health_and_cors(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert [m["name"] for m in client.get("/models").json()] == ["SmolLM2-135M-Instruct", "tiny-random", "tiny-narrow"]
    # The original page opened from a file sends `Origin: null`.
    preflight = client.options(
        "/conversations/1/generate",
        headers={"Origin": "null", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "null"
    other = client.get("/conversations", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_conversation_of_over_4_mb_loads_whole(client, serve_app):
    # Calls between deployments go over gRPC in Serve's throughput-optimized mode (serve.env),
    # whose replicas refuse messages over 4 MB unless told otherwise: a long conversation's
    # history, the history deployment's answer to the ingress, passes that. (Written straight
    # into SQLite: through the API each turn would tokenize the whole history.)
    conversation_id = start(client)
    answer = "é" * 450_000  # 900 KB of UTF-8
    with sqlite3.connect(serve_app.database_path) as db:
        for turn in range(5):
            for role, content in (("user", f"turn {turn}: go on"), ("assistant", answer)):
                db.execute(
                    "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, ?, ?, datetime('now'))",
                    (conversation_id, role, content),
                )
    response = client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 200, response.text[:500]
    assert [m["content"] for m in response.json()["messages"][1::2]] == [answer] * 5
    assert len(response.content) > 4 * 2**20
