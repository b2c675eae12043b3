"""The FastAPI app without Ray: routing of errors, validation and the API key, for requests that
are answered before any deployment is called."""

from __future__ import annotations

import asyncio
import inspect
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from deployments.call_channel import CallClient
from deployments.model_registry import ModelRegistry
from serve_app.conversations import ConversationService
from serve_app.ingress import MAX_BODY_BYTES, Services, create_app, first_calls, model_channels
from serve_app.served_models import ServedModels
from serve_app.settings import AppSettings
from serve_app.turns import TurnService

KEY = "s3cret-key-123"


def client_for(**settings) -> TestClient:
    app_settings = AppSettings.model_validate({"api_key": None, **settings})
    registry = ModelRegistry(app_settings.models)
    services = Services(ServedModels(registry, {}), ConversationService(None), TurnService(registry, models={}, history=None))
    return TestClient(create_app(app_settings, services))


class RecordingHandle:
    """Stands for a DeploymentHandle: `handle.method.remote()` records (deployment, method)."""

    def __init__(self, name: str, calls: list[tuple[str, str]]):
        self.name, self.calls = name, calls

    def __getattr__(self, method: str) -> SimpleNamespace:
        def remote() -> tuple[str, str]:
            self.calls.append((self.name, method))
            return self.name, method

        return SimpleNamespace(remote=remote)


async def test_a_starting_ingress_calls_each_deployment_once_but_no_model_that_may_have_scaled_to_zero():
    tiny = {"kind": "tiny_random"}
    settings = AppSettings.model_validate(
        {
            "models": [
                {"name": "fixed", "source": tiny},
                {"name": "idle", "source": tiny, "autoscaling_config": {"min_replicas": 0, "max_replicas": 2}},
                {"name": "scaled", "source": tiny, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
            ]
        }
    )
    calls: list[tuple[str, str]] = []
    models = {name: RecordingHandle(name, calls) for name in ("fixed", "idle", "scaled")}
    channels = model_channels(settings, models)
    assert list(channels) == ["fixed"]  # the others may have other replicas than one
    made = first_calls(settings, models, channels, CallClient(RecordingHandle("history", calls), "history"))
    assert made[:1] == calls == [("scaled", "stats")]
    # The channels' first calls ask their replica where the channel is, and are the only calls
    # to it (the recording handle's answer is no address, so the channel stays shut and calls
    # would go through the handle).
    assert await asyncio.gather(*made[1:]) == [False, False]
    assert calls[1:] == [("fixed", "address"), ("history", "address")]


def test_models_are_listed_without_a_key_when_none_is_configured():
    response = client_for().get("/models")
    assert response.status_code == 200
    assert response.json() == [{"name": "SmolLM2-135M-Instruct", "aliases": ["smollm2"], "revision": "main", "is_default": True}]


@pytest.mark.parametrize("header", [None, "Bearer wrong-key-000", KEY, f"Basic {KEY}"])
def test_api_routes_refuse_a_missing_or_wrong_key(header):
    client = client_for(api_key=KEY)
    headers = {"Authorization": header} if header else {}
    response = client.get("/models", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "missing or wrong API key" in response.json()["detail"]
    openai_style = client.get("/v1/models", headers=headers).json()
    assert openai_style["error"]["code"] == 401 and "API key" in openai_style["error"]["message"]


def test_the_right_key_opens_the_api_and_probes_and_page_stay_open():
    client = client_for(api_key=KEY)
    assert client.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200
    preflight = client.options("/conversations", headers={"Origin": "null", "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "null"


def test_a_short_api_key_is_rejected_at_build_time():
    with pytest.raises(ValueError, match="at least 8 characters"):
        AppSettings.model_validate({"api_key": "short"})


def test_original_routes_answer_bad_bodies_with_field_messages():
    client = client_for()
    response = client.post("/conversations/1/generate", json={"prompt": "hi", "temperature": -1})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "temperature"]
    response = client.post("/conversations/1/generate", content=b"{oops", headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (400, {"detail": "the request body is not valid JSON"})


def test_openai_routes_answer_bad_bodies_in_openai_shape():
    client = client_for()
    response = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": [], "temperature": 9})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"  # the first bad field
    assert "messages: List should have at least 1 item" in error["message"]
    assert "temperature: Input should be less than or equal to 2" in error["message"]


def test_unknown_model_is_404_before_any_deployment_is_called():
    client = client_for()
    response = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "model 'nope' is not served here; available models: SmolLM2-135M-Instruct"
    response = client.post("/conversations/1/generate", json={"prompt": "hi", "model": "nope"})
    assert response.status_code == 404 and "available models" in response.json()["detail"]


def test_every_error_is_answered_on_the_event_loop_not_the_thread_pool():
    # Starlette runs an exception handler that is a plain function on its thread pool: a hop to
    # another thread and back for every refusal (3x the app's time for a 404, bench.app_bench).
    handlers = client_for().app.exception_handlers
    assert len(handlers) > 10
    assert [handler for handler in handlers.values() if not inspect.iscoroutinefunction(handler)] == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "hi", "top_k": 92081372754769103375368022717890560}, "top_k"),  # beyond int64
        ({"prompt": "hi", "top_k": 10**6 + 1}, "top_k"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ],
)
def test_numbers_out_of_range_and_empty_prompts_are_refused_at_the_edge_naming_the_field(body, field):
    response = client_for().post(
        "/v1/completions", content=json.dumps({"model": "smollm2", **body}), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_beyond_the_limit_are_refused_with_413_before_they_are_read(chunked):
    body = json.dumps({"model": "smollm2", "prompt": "a" * MAX_BODY_BYTES}).encode()
    content = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    response = client_for().post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == f"the request body is larger than {MAX_BODY_BYTES} bytes"
    response = client_for().post("/conversations/1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    # Just under the limit, the body is read and the field named.
    body = json.dumps({"prompt": "a" * (MAX_BODY_BYTES - 100)})
    response = client_for().post("/conversations/1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompt"]


@pytest.mark.parametrize(
    "headers, body, field",
    [
        ({}, {"conversation_id": 2**63}, "conversation_id"),  # beyond SQLite's INTEGER: was a 503
        ({}, {"conversation_id": 0}, "conversation_id"),
        ({"X-Conversation-Id": str(2**63)}, {}, "x-conversation-id"),
        ({"X-Conversation-Id": "9" * 5000}, {}, "x-conversation-id"),
    ],
)
def test_conversation_ids_out_of_range_are_refused_naming_the_field(headers, body, field):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **body}
    response = client_for().post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


JSON = {"content-type": "application/json"}


def test_a_body_that_is_not_utf8_is_a_400_that_says_why():
    client = client_for()
    response = client.post("/v1/completions", content=b'{"model": "smollm2", "prompt": "caf\xe9"}', headers=JSON)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON ('utf-8' codec can't decode byte 0xe9")
    response = client.post("/conversations/1/generate", content=b"[" * 100_000, headers=JSON)
    assert response.status_code == 400 and "maximum recursion depth" in response.json()["detail"]


def test_a_422_that_echoes_a_lone_surrogate_is_still_sent():
    # The 422 echoes the bad input; UTF-8 cannot encode "\ud800", so it was a 500.
    response = client_for().patch("/conversations/1", content=b'{"title": "a\\ud800"}', headers=JSON)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


def test_unknown_routes_under_v1_answer_in_openai_shape():
    response = client_for().get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"


def test_a_wrong_method_gets_405_with_every_method_the_path_allows():
    client = client_for()
    response = client.put("/conversations")  # GET lists, POST creates: two routes, one path
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) >= {"GET", "POST"}
    assert "allowed: " in response.json()["detail"]
    # /conversations/start is its own path, although /conversations/{conversation_id} matches it too.
    assert client.put("/conversations/start").headers["allow"] == "GET"
    # The static files answer their own 405 with their own `Allow`.
    static = client.post("/static/app.js")
    assert static.status_code == 405 and static.headers["allow"] == "GET, HEAD"


def test_the_openapi_schema_says_what_the_routes_do():
    paths = client_for().get("/openapi.json").json()["paths"]
    generate = paths["/conversations/{conversation_id}/generate"]["post"]["responses"]
    assert list(generate["200"]["content"]) == ["text/plain; charset=utf-8"]
    # Errors are JSON even where the answer is streamed text.
    assert all(list(generate[code]["content"]) == ["application/json"] for code in ("400", "404", "409", "413", "422"))
    (header,) = paths["/v1/chat/completions"]["post"]["parameters"]
    assert header["schema"]["type"] == "integer" and "anyOf" not in header["schema"]  # never null
    schemas = client_for().get("/openapi.json").json()["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0]["minLength"] == 1 and prompt[1]["maxItems"] == 1
