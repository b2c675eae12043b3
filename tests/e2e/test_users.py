"""`auth: users` against the real service, started as `RAY_CHAT_AUTH=users make serve` starts it
(the launcher, serve.env, HAProxy), on a database the release before users wrote: every
conversation route, listed from the app's own route table, keeps one user's conversations from
another; every API route wants a live key; `make user`'s CLI works while the service runs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import httpx
import pytest

from loadtests.service import free_port, running_service
from tests.support import NOW, RELEASED_SCHEMA, REPO_ROOT

pytestmark = pytest.mark.slow

TINY = "tiny-random"
MODELS = [{"name": TINY, "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}]
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
OPEN = ("/", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


def users_cli(database, *args: str) -> str:
    """`make user`'s CLI; its last line (the key, where it prints one)."""
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.users", "--database", str(database), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


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
    app_args = {"database_path": str(database)}
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
