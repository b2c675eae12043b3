"""`auth: users` against the real service, started as `RAY_CHAT_AUTH=users make serve` starts it
(the launcher, serve.env, HAProxy) with two ingress replicas, on a database the release before
users wrote: every conversation route, listed from the app's own route table, keeps one user's
conversations from another; every API route wants a live key; `make user`'s CLI works while the
service runs; each user's limits hold across both ingress replicas."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loadtests.service import free_port, running_service
from tests.support import NOW, RELEASED_SCHEMA, metric_by_replica, users_cli

pytestmark = pytest.mark.slow

TINY = "tiny-random"
SLOW = "random-135m"  # SmolLM2-135M's shape, random: its answers stream for seconds on a CPU
MODELS = [
    {"name": TINY, "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1},
    {"name": SLOW, "source": {"kind": "tiny_random", "shape": "smollm2"}, "num_cpus": 0.2, "torch_threads": 1},
]
# A valid request to each route that names a conversation; a route added without an entry here fails the test.
CONVERSATION_ROUTES = {
    ("get", "/conversations/{conversation_id}"): None,
    ("patch", "/conversations/{conversation_id}"): {"title": "taken over"},
    ("delete", "/conversations/{conversation_id}"): None,
    ("get", "/conversations/{conversation_id}/export"): None,
    ("post", "/conversations/{conversation_id}/generate"): {"prompt": "hi", "model": TINY, "sample_len": 4},
    ("post", "/conversations/{conversation_id}/regenerate"): {"model": TINY, "sample_len": 4},
    ("post", "/conversations/{conversation_id}/stop"): None,
}
SERIAL_STREAMS = 4
# Each quota test's user has one limit of its own; everyone else has the defaults.
QUOTAS = {
    "users": {
        "streamer": {"concurrent_streams": 2},
        "hurried": {"requests_per_minute": 3},
        "wordy": {"tokens_per_day": 20},
        "serial": {"concurrent_streams": SERIAL_STREAMS},
    }
}
OPEN = ("/", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


def released_database(path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(RELEASED_SCHEMA)
        db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('from before', ?, ?)", (NOW, NOW))
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (1, 'user', 'old prompt', ?)", (NOW,)
        )


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    database = tmp_path_factory.mktemp("users") / "history.sqlite3"
    released_database(database)
    app_args = {"database_path": str(database), "ingress_num_replicas": 2, "quotas": QUOTAS}
    with running_service(MODELS, free_port(), app_args=app_args, env={"RAY_CHAT_AUTH": "users"}) as running:
        yield running, database


def client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def test_another_users_conversation_is_not_found_on_every_route_and_stays_unchanged(service):
    running, database = service
    alice = client(running.url, users_cli(database, "add", "alice"))
    bob = client(running.url, users_cli(database, "add", "bob"))
    conversation_id = alice.get("/conversations/start").json()
    answered = alice.post(
        f"/conversations/{conversation_id}/generate", json={"prompt": "alice's secret", "model": TINY, "sample_len": 4}
    )
    assert answered.status_code == 200
    before = alice.get(f"/conversations/{conversation_id}").json()

    schema = alice.get("/openapi.json").json()
    routes = {(method, path) for path, item in schema["paths"].items() if "{conversation_id}" in path for method in item}
    assert routes == set(CONVERSATION_ROUTES), "a route that names a conversation needs its request here"
    for (method, path), body in CONVERSATION_ROUTES.items():
        response = bob.request(method.upper(), path.format(conversation_id=conversation_id), json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert "alice" not in response.text
    chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "conversation_id": conversation_id}
    refused = bob.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == 404
    assert alice.get(f"/conversations/{conversation_id}").json() == before

    assert bob.get("/conversations").json() == [] and bob.get("/conversations?detail=true").json() == []
    assert alice.get("/conversations").json() == [conversation_id]
    assert alice.post("/v1/chat/completions", json=chat).status_code == 200  # alice's own, through /v1
    assert alice.get("/conversations?all=true").status_code == 403


def test_the_released_conversations_belong_to_the_configured_admin_who_may_list_all(service):
    running, database = service
    admin = client(running.url, users_cli(database, "rotate", "admin"))  # made by the migration, without a key
    assert 1 in admin.get("/conversations").json()
    assert [m["content"] for m in admin.get("/conversations/1").json()["messages"]] == ["old prompt"]
    carol = client(running.url, users_cli(database, "add", "carol"))
    carols = carol.get("/conversations/start").json()
    assert carol.get("/conversations/1").status_code == 404
    assert carols not in admin.get("/conversations").json()
    assert {1, carols} <= set(admin.get("/conversations?all=true").json())


def test_every_api_route_wants_a_live_key_and_a_revoked_one_is_refused_at_once(service):
    running, database = service
    key = users_cli(database, "add", "dave")
    schema = httpx.get(f"{running.url}/openapi.json").json()
    operations = [(m, p.replace("{conversation_id}", "1")) for p, item in schema["paths"].items() for m in item if p not in OPEN]
    assert len(operations) >= 15
    assert client(running.url, key).get("/models").status_code == 200
    users_cli(database, "revoke", key[:10])
    for credentials in (None, "rc-not-a-key", key):
        for method, path in operations:
            response = client(running.url, credentials).request(method.upper(), path)
            assert response.status_code == 401, (credentials, method, path)
            assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/", "/healthz", "/readyz", "/static/app.js"):
        assert httpx.get(f"{running.url}{path}").status_code == 200


def completion(client: httpx.Client, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": TINY, "prompt": "count", "max_tokens": max_tokens, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def assert_rate_limited(response: httpx.Response, limit: str, counts: str) -> int:
    """The 429 of a `/v1` request over `limit`: OpenAI's rate-limit error; its `Retry-After`."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (counts, "rate_limit_exceeded")
    assert f"`{limit}`" in error["message"]
    return int(response.headers["retry-after"])


def test_streams_at_once_are_limited_per_user_across_both_ingress_replicas(service):
    running, database = service
    streamer = client(running.url, users_cli(database, "add", "streamer"))
    other = client(running.url, users_cli(database, "add", "bystander"))
    long = {"model": SLOW, "prompt": "count", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with (
        streamer.stream("POST", "/v1/completions", json=long) as first,
        streamer.stream("POST", "/v1/completions", json=long) as second,
    ):
        # Kept: an iterator dropped would close its connection, and the server would end its stream.
        readers = [stream.iter_bytes() for stream in (first, second)]
        for stream, reader in zip((first, second), readers):
            assert stream.status_code == 200
            next(reader)  # streaming: both hold a place
        assert assert_rate_limited(completion(streamer, 2), "concurrent_streams", "requests") == 1
        conversation_id = streamer.get("/conversations/start").json()
        refused = streamer.post(f"/conversations/{conversation_id}/generate", json={"prompt": "hi", "model": TINY})
        assert refused.status_code == 429 and "`concurrent_streams`" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        assert streamer.get(f"/conversations/{conversation_id}").json()["messages"] == []  # refused before any work
        assert completion(other, 2).status_code == 200  # someone else's streams are theirs
    # The two streams were relayed by different ingress replicas: the limit held across them.
    # Read until both are counted: a scrape leaves out a replica too busy to answer it in time.
    deadline = time.monotonic() + 30
    while sum((ended := metric_by_replica(streamer, "chat_user_requests_total", user="streamer")).values()) < 2:
        assert time.monotonic() < deadline, ended
        time.sleep(0.2)
    assert len(ended) == 2, ended
    # Closed by the client: each place is given back once its response ends.
    deadline, refused_after = time.monotonic() + 30, 0
    while (answer := completion(streamer, 2)).status_code == 429 and time.monotonic() < deadline:
        refused_after += 1
        time.sleep(0.2)
    assert answer.status_code == 200
    deadline = time.monotonic() + 30
    while (
        refusals := sum(
            metric_by_replica(streamer, "chat_user_refusals_total", user="streamer", limit="concurrent_streams").values()
        )
    ) != 2 + refused_after:
        assert time.monotonic() < deadline, refusals
        time.sleep(0.2)


def test_requests_per_minute_are_limited_across_both_ingress_replicas(service):
    running, database = service
    hurried = client(running.url, users_cli(database, "add", "hurried"))
    for _ in range(3):
        assert completion(hurried, 1).status_code == 200
    retry_after = assert_rate_limited(completion(hurried, 1), "requests_per_minute", "requests")
    assert 1 <= retry_after <= 60
    assert len(metric_by_replica(hurried, "chat_user_requests_total", user="hurried")) == 2  # both replicas counted


def test_generated_tokens_per_day_are_limited_and_usage_shows_them(service):
    running, database = service
    wordy = client(running.url, users_cli(database, "add", "wordy"))
    for _ in range(2):  # 15 generated, under 20: allowed; 30: over, and the next is refused
        answer = completion(wordy, 15)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 15
    retry_after = assert_rate_limited(completion(wordy, 1), "tokens_per_day", "tokens")
    assert 1 <= retry_after <= 86400
    [usage] = wordy.get("/v1/usage").json()["data"]
    assert (usage["user"], usage["requests"], usage["completion_tokens"], usage["active_streams"]) == ("wordy", 2, 30, 0)
    assert usage["limits"] == {"concurrent_streams": 8, "requests_per_minute": None, "tokens_per_day": 20}
    assert wordy.get("/v1/usage?all=true").status_code == 403
    admin = client(running.url, users_cli(database, "rotate", "admin"))
    everyone = {row["user"]: row for row in admin.get("/v1/usage?all=true").json()["data"]}
    assert everyone["wordy"]["completion_tokens"] == 30 and "admin" in everyone
    assert sum(metric_by_replica(admin, "chat_user_generated_tokens_total", user="wordy").values()) == 30


def test_an_answer_that_has_ended_frees_its_place_for_the_next_request_at_once(service):
    """As many clients as the user may have streams, each sending its next request the moment the
    last answer's last byte arrived: every one is let in (the place is given back before those
    bytes are sent), streamed or not, through either ingress replica."""
    running, database = service
    key = users_cli(database, "add", "serial")

    def one_client(index: int) -> list[int]:
        with client(running.url, key) as serial:
            conversation_id = serial.get("/conversations/start").json()
            statuses = []
            for turn in range(8):
                statuses.append(completion(serial, 3, stream=bool(turn % 2)).status_code)
                body = {"prompt": "go", "model": TINY, "sample_len": 3}
                statuses.append(serial.post(f"/conversations/{conversation_id}/generate", json=body).status_code)
            return statuses

    with ThreadPoolExecutor(SERIAL_STREAMS) as pool:
        statuses = [status for each in pool.map(one_client, range(SERIAL_STREAMS)) for status in each]
    assert statuses == [200] * len(statuses), statuses
