"""Fixtures of the end-to-end tests (the app itself: `serve_app` in tests/conftest.py)."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def sdk(serve_app):
    """The official `openai` SDK against the app's `/v1`."""
    with openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client
