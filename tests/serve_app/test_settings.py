from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.app import build_app, deployment_name
from serve_app.settings import AppSettings
from tests.support import config_app_args


def test_serve_config_args_validate_and_paths_become_absolute():
    settings = AppSettings.model_validate(config_app_args()).resolved()
    assert settings.database_path.is_absolute()
    assert settings.database_path == Path("data/history.sqlite3").resolve()
    assert [m.name for m in settings.models] == ["SmolLM2-135M-Instruct"]
    assert settings.models[0].context_length == 2048


def test_unknown_keys_and_duplicate_models_stop_the_build():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppSettings.model_validate({"databse_path": "x"})
    with pytest.raises(ValidationError, match="'a' is configured twice"):
        AppSettings.model_validate({"models": [{"name": "a"}, {"name": "b", "aliases": ["a"]}]})


def test_each_model_becomes_its_own_named_deployment():
    app = build_app({"models": [{"name": "SmolLM2-135M-Instruct"}, {"name": "org/model:v1", "source": {"kind": "tiny_random"}}]})
    assert app is not None
    assert deployment_name(AppSettings.model_validate({"models": [{"name": "org/model:v1"}]}).models[0]) == "LLM-org_model_v1"


def test_the_ingress_runs_as_many_replicas_as_configured_or_autoscales():
    assert build_app({})._bound_deployment.num_replicas == 1
    assert build_app({"ingress_num_replicas": 3})._bound_deployment.num_replicas == 3
    scaled = build_app({"ingress_autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}})
    autoscaling = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 64)
    with pytest.raises(ValidationError, match="ingress_num_replicas"):
        AppSettings.model_validate({"ingress_num_replicas": 0})


def test_the_history_replica_takes_many_calls_at_once():
    """Serve's default of 5 made the turns of a burst queue for history in their callers."""
    settings, models, history = build_app({})._bound_deployment.init_args
    assert history._bound_deployment.name == "HistoryDeployment"
    assert history._bound_deployment._deployment_config.max_ongoing_requests == settings.history_max_ongoing_requests == 1024


def test_the_auth_mode_comes_from_the_config_the_environment_or_the_key(monkeypatch):
    monkeypatch.delenv("RAY_CHAT_API_KEY", raising=False)
    monkeypatch.delenv("RAY_CHAT_AUTH", raising=False)
    assert AppSettings().auth == "none"
    assert AppSettings(api_key="shared-key-1").auth == "key"
    monkeypatch.setenv("RAY_CHAT_AUTH", "users")
    assert AppSettings().auth == "users"
    assert AppSettings(auth="none").auth == "none"  # the config wins
    with pytest.raises(ValueError, match="auth: key needs api_key"):
        AppSettings(auth="key")
    monkeypatch.setenv("RAY_CHAT_AUTH", "everyone")
    with pytest.raises(ValueError, match="auth"):
        AppSettings()
