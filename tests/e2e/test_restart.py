"""History lives in the SQLite file, not in any replica: it survives redeploying the app."""

from __future__ import annotations

import httpx
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
