"""Schema-driven fuzzing of the running app: the schemathesis CLI reads its `/openapi.json` and
sends every route generated requests, valid and invalid (the schema's examples; the boundary
values, wrong types, content types and methods of its coverage phase; random ones), then follows
the schema's links from a new conversation to every route that takes its id, so those routes get
real ids. The explicit cases below cover what a generator rarely draws: ids beyond int64, empty
and 1 MiB bodies, wrong content types, bytes that are not UTF-8.

Every request must get an answer that is not a 5xx within `REQUEST_TIMEOUT_S`, and a stream must
end as its protocol says (`fuzz_hooks.streams_end_cleanly`). Generated answers run on the tiny
random model with a few tokens (`fuzz_hooks.keep_generation_cheap`). `make fuzz` runs more
examples (`FUZZ_EXAMPLES`); the default keeps this file at about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from loadtests.service import free_port, running_service
from serve_app.ingress import MAX_BODY_BYTES
from tests.e2e.fuzz_hooks import CHEAP_MODEL, CHEAP_TOKENS
from tests.support import REPO_ROOT, users_cli

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 30  # as in schemathesis.toml: a tiny-model answer takes well under a second
MIN_REQUESTS = 1000
# Routes that answer 200 only for an existing conversation: given ids from the links.
ROUTES_NEEDING_AN_ID = {
    "POST /conversations/{conversation_id}/generate",
    "POST /conversations/{conversation_id}/regenerate",
    "PATCH /conversations/{conversation_id}",
    "GET /conversations/{conversation_id}/export",
    "DELETE /conversations/{conversation_id}",
}


@pytest.fixture(scope="module")
def base_url(serve_app) -> str:
    return serve_app.url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


def schemathesis_run(base_url: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Counter:
    """A schemathesis CLI run against the app at `base_url` (schemathesis.toml, fuzz_hooks.py),
    which must find nothing; each (route, status, linked, whose id) with the number of requests."""
    ledger = tmp_path / "requests.tsv"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        f"{base_url}/openapi.json",
        "--no-color",
        *args,
    ] + (["--max-examples", os.environ["FUZZ_EXAMPLES"]] if "FUZZ_EXAMPLES" in os.environ else [])
    command += ["--seed", os.environ["FUZZ_SEED"]] if "FUZZ_SEED" in os.environ else []  # replays a failed run
    # Hypothesis keeps caches of its own in ./.hypothesis unless told otherwise.
    env = os.environ | {"FUZZ_LEDGER": str(ledger), "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")} | (env or {})
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-30_000:] + run.stderr[-5_000:]
    return Counter(tuple(line.split("\t")) for line in ledger.read_text().splitlines())


def assert_every_route_was_fuzzed(http: httpx.Client, answers: Counter) -> None:
    routes = {label for label, *_ in answers}
    paths = http.get("/openapi.json").json()["paths"]
    operations = {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
    assert routes >= operations, f"routes never fuzzed: {operations - routes}"
    assert sum(answers.values()) >= MIN_REQUESTS, answers
    # The links carried real ids into every route that needs one, and answers were generated.
    assert ROUTES_NEEDING_AN_ID <= {label for label, _, linked, _ in answers if linked}, answers
    assert answers["POST /conversations/{conversation_id}/generate", "200", "linked", "own"] > 0, answers


def test_schemathesis_finds_no_server_error_on_any_route(base_url, http, tmp_path):
    assert_every_route_was_fuzzed(http, schemathesis_run(base_url, tmp_path))


# ---------------------------------------------------------------------------------------------
# With users (`auth: users`): a valid key, then the wrong user's.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_app():
    models = [{"name": CHEAP_MODEL, "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}]
    with running_service(models, free_port(), env={"RAY_CHAT_AUTH": "users"}) as running:
        yield running


def test_schemathesis_with_a_users_key_finds_no_server_error(users_app, tmp_path):
    key = users_cli(users_app.database, "add", "fuzzer")
    answers = schemathesis_run(users_app.url, tmp_path, "-H", f"Authorization: Bearer {key}")
    with httpx.Client(base_url=users_app.url, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S) as http:
        assert_every_route_was_fuzzed(http, answers)
    assert not any(status == "401" for _, status, *_ in answers), answers


def test_schemathesis_as_the_wrong_user_never_sees_another_users_conversations(users_app, tmp_path):
    """carol's conversations hold a secret; bob's fuzzing sends half its requests that name a
    conversation to hers. None may answer with her content (`shows_no_other_users_content`),
    none may succeed, and hers are unchanged after."""
    carol = httpx.Client(
        base_url=users_app.url,
        headers={"Authorization": f"Bearer {users_cli(users_app.database, 'add', 'carol')}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    secret = f"carols-secret-{uuid.uuid4().hex}"
    ids = [carol.get("/conversations/start").json() for _ in range(3)]
    for conversation_id in ids:
        prompt = {"prompt": f"{secret} {conversation_id}", "model": CHEAP_MODEL, "sample_len": CHEAP_TOKENS}
        assert carol.post(f"/conversations/{conversation_id}/generate", json=prompt).status_code == 200
    before = [carol.get(f"/conversations/{conversation_id}").json() for conversation_id in ids]
    bob = users_cli(users_app.database, "add", "bob")
    env = {"FUZZ_FOREIGN_IDS": ",".join(map(str, ids)), "FUZZ_SECRET": secret}
    answers = schemathesis_run(users_app.url, tmp_path, "-H", f"Authorization: Bearer {bob}", "--max-examples", "10", env=env)
    foreign = {(label, status): count for (label, status, _, whose), count in answers.items() if whose == "foreign"}
    assert sum(foreign.values()) >= 50, answers
    assert all(status.startswith("4") for _, status in foreign), foreign
    assert [carol.get(f"/conversations/{conversation_id}").json() for conversation_id in ids] == before


# ---------------------------------------------------------------------------------------------
# What a generator rarely draws.
# ---------------------------------------------------------------------------------------------

CONVERSATION_ROUTES = [
    ("GET", "", None),
    ("PATCH", "", {"title": "x"}),
    ("DELETE", "", None),
    ("GET", "/export", None),
    ("POST", "/generate", {"prompt": "hi", "model": CHEAP_MODEL, "sample_len": CHEAP_TOKENS}),
    ("POST", "/regenerate", {"model": CHEAP_MODEL, "sample_len": CHEAP_TOKENS}),
    ("POST", "/stop", None),
]
CHAT = {"model": CHEAP_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CHEAP_TOKENS}
COMPLETION = {"model": CHEAP_MODEL, "prompt": "hi", "max_tokens": CHEAP_TOKENS}
RESPONSE = {"model": CHEAP_MODEL, "input": "hi", "max_output_tokens": CHEAP_TOKENS}
# (method, path, a valid body): every route that reads a body; `{id}` is a fresh conversation.
BODY_ROUTES = [
    ("POST", "/conversations/{id}/generate", {"prompt": "hi", "model": CHEAP_MODEL, "sample_len": CHEAP_TOKENS}),
    ("POST", "/conversations/{id}/regenerate", {"model": CHEAP_MODEL, "sample_len": CHEAP_TOKENS}),
    ("PATCH", "/conversations/{id}", {"title": "x"}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", COMPLETION),
    ("POST", "/v1/responses", RESPONSE),
]
# A string field of each, for the tests that spoil its encoding.
TEXT_FIELD = {
    "/conversations/{id}/generate": "prompt",
    "/conversations/{id}/regenerate": "model",
    "/conversations/{id}": "title",
    "/v1/chat/completions": "model",
    "/v1/completions": "prompt",
    "/v1/responses": "input",
}
JSON = {"content-type": "application/json"}


def send(http: httpx.Client, method: str, path: str, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if "{id}" in path:
        path = path.replace("{id}", str(http.get("/conversations/start").json()))
    return http.request(method, path, content=content, headers=headers)


def field_named(response: httpx.Response) -> str:
    """The field a 4xx names: OpenAI's `param` on /v1, the first error's location elsewhere."""
    body = response.json()
    if "error" in body:
        return body["error"]["param"]
    return ".".join(str(part) for part in body["detail"][0]["loc"][1:]) or "body"


@pytest.mark.parametrize("raw_id", [str(2**63), "9" * 30, "9" * 5000, "0"])
@pytest.mark.parametrize(("method", "suffix", "body"), CONVERSATION_ROUTES, ids=[f"{m}{s}" for m, s, _ in CONVERSATION_ROUTES])
def test_ids_beyond_int64_name_no_conversation(http, raw_id, method, suffix, body):
    # 2**63 reached SQLite and came back as a 503; 5,000 digits made int() raise; "0" checks that
    # the not-found error keeps its message across Ray.
    response = http.request(method, f"/conversations/{raw_id}{suffix}", json=body)
    assert response.status_code == 404
    assert response.json() == {"detail": f"conversation '{raw_id}' not found"}


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ({"conversation_id": 2**63}, {}, "conversation_id"),
        ({"conversation_id": -(2**64)}, {}, "conversation_id"),
        ({}, {"X-Conversation-Id": str(2**63)}, "x-conversation-id"),
        ({}, {"X-Conversation-Id": "9" * 5000}, "x-conversation-id"),
    ],
)
def test_conversation_ids_beyond_int64_in_chat_are_refused_naming_the_field(http, body, headers, field):
    response = http.post("/v1/chat/completions", json=CHAT | body, headers=headers)
    assert response.status_code == 400
    assert field_named(response) == field


@pytest.mark.parametrize("value", [2**64, -(2**64), 10**400, 1e300])
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/conversations/{id}/generate", BODY_ROUTES[0][2], field)
        for field in ("sample_len", "temperature", "top_p", "repeat_penalty", "repeat_last_n", "seed")
    ]
    + [("/v1/completions", COMPLETION, field) for field in ("max_tokens", "temperature", "top_p", "seed", "top_k", "min_tokens")]
    + [("/v1/chat/completions", CHAT, field) for field in ("max_completion_tokens", "repetition_penalty", "conversation_id")]
    + [("/v1/responses", RESPONSE, field) for field in ("max_output_tokens", "temperature")],
)
def test_numbers_beyond_int64_are_refused_naming_the_field(http, path, body, field, value):
    response = send(http, "POST", path, json.dumps(body | {field: value}).encode(), JSON)
    assert response.status_code in (400, 422), response.text
    assert field_named(response) == field


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/conversations/{id}/generate", {"prompt": ""}, 422, "prompt"),
        ("/conversations/{id}", {"title": ""}, 422, "title"),
        ("/v1/completions", COMPLETION | {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", COMPLETION | {"prompt": [""]}, 400, "prompt"),
        ("/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
        ("/v1/responses", RESPONSE | {"input": ""}, 400, "input"),
        ("/v1/responses", RESPONSE | {"input": []}, 400, "input"),
    ],
)
def test_empty_prompts_are_refused_naming_the_field(http, path, body, status, field):
    response = send(http, "PATCH" if path.endswith("{id}") else "POST", path, json.dumps(body).encode(), JSON)
    assert response.status_code == status
    assert field_named(response) == field


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES)
def test_empty_bodies_are_refused_naming_the_body(http, method, path, body):
    response = send(http, method, path, b"", JSON)
    if path.endswith("/regenerate"):  # the body is optional there; a new conversation has nothing to answer
        assert response.status_code == 400 and "has no prompt to answer again" in response.json()["detail"]
    else:
        assert response.status_code in (400, 422)
        assert field_named(response) == "body"


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES)
def test_a_body_over_one_mib_is_refused_with_413(http, method, path, body):
    response = send(http, method, path, json.dumps(body | {"prompt": "a" * MAX_BODY_BYTES}).encode(), JSON)
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/conversations/{id}/generate", {"prompt": "a" * (MAX_BODY_BYTES - 100)}, 422, "at most 100000 characters"),
        ("/v1/completions", COMPLETION | {"prompt": "a" * (MAX_BODY_BYTES - 100)}, 400, "has a context of 512 tokens"),
        ("/v1/responses", RESPONSE | {"input": "a" * (MAX_BODY_BYTES - 100)}, 400, "has a context of 512 tokens"),
        (
            "/v1/chat/completions",
            CHAT | {"messages": [{"role": "user", "content": "a" * (MAX_BODY_BYTES - 200)}]},
            400,
            "has a context of 512 tokens",
        ),
    ],
)
def test_a_prompt_of_almost_one_mib_is_refused_as_too_long(http, path, body, status, message):
    response = send(http, "POST", path, json.dumps(body).encode(), JSON)
    assert response.status_code == status
    assert message in response.text


def test_thirty_thousand_messages_are_cut_to_the_latest_that_fit_and_answered(http):
    # Under 1 MiB. The chat template was rendered once per dropped turn, here 30,000 times, with the
    # model's replica (and every request on it) held meanwhile.
    messages = [{"role": "user", "content": str(i % 10)} for i in range(30_000)]
    response = http.post("/v1/chat/completions", json=CHAT | {"messages": messages})
    assert response.status_code == 200
    assert 0 < response.json()["usage"]["prompt_tokens"] <= 512 - CHEAP_TOKENS
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/xml", None]
)
def test_wrong_content_types_are_refused_naming_the_body(http, method, path, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = send(http, method, path, json.dumps(body).encode(), headers)
    assert response.status_code in (400, 422), response.text
    assert field_named(response) == "body"


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES)
@pytest.mark.parametrize("bad_bytes", [b"\xff\xfe", b"caf\xe9", b"\xc0\xaf", b"\xed\xa0\x80"])
def test_bodies_that_are_not_utf8_are_refused(http, method, path, body, bad_bytes):
    field = TEXT_FIELD[path]
    content = json.dumps(body | {field: "@"}).encode().replace(b"@", bad_bytes)
    response = send(http, method, path, content, JSON)
    if bad_bytes == b"\xed\xa0\x80":  # a surrogate in UTF-8's form: Python's JSON reads it as one, the field refuses it
        assert response.status_code in (400, 422) and field_named(response) == field
    else:
        assert response.status_code == 400
        assert "the request body is not valid JSON ('utf-8' codec can't decode" in response.text


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/conversations/{id}/generate", {"prompt": "a\ud800"}, "prompt"),
        ("POST", "/conversations/{id}/generate", {"prompt": "hi", "model": "\udfff"}, "model"),
        ("POST", "/conversations/{id}/regenerate", {"revision": "\ud800"}, "revision"),
        ("PATCH", "/conversations/{id}", {"title": "a\ud800"}, "title"),
        ("POST", "/v1/completions", COMPLETION | {"prompt": "a\ud800"}, "prompt"),
        ("POST", "/v1/completions", COMPLETION | {"stop": ["\ud800"]}, "stop"),
        ("POST", "/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ],
)
def test_lone_surrogates_escaped_in_json_are_refused_naming_the_field(http, method, path, body, field):
    # Valid JSON, not valid text: it reached the tokenizer (503) or SQLite and the 422 that
    # echoed it (500).
    response = send(http, method, path, json.dumps(body).encode(), JSON)
    assert response.status_code in (400, 422), response.text
    assert field_named(response) == field


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": ' + b"9" * 5000 + b"}"])
def test_json_nested_too_deep_or_numbers_too_long_to_parse_are_refused(http, body):
    response = send(http, "POST", "/conversations/{id}/generate", body, JSON)
    assert response.status_code == 400
    assert "the request body is not valid JSON" in response.json()["detail"]
