from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.model_registry import (
    HubSource,
    ModelConfig,
    ModelRegistry,
    PackagedGGUFSource,
    TinyRandomSource,
    UnknownModelError,
)


def registry() -> ModelRegistry:
    return ModelRegistry(
        [
            ModelConfig(name="SmolLM2-135M-Instruct", aliases=["smollm2"]),
            ModelConfig(
                name="Qwen2.5-0.5B-Instruct",
                aliases=["Qwen0_5b"],
                source={"kind": "hf", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "v1"},
            ),
        ]
    )


def test_resolves_names_aliases_and_the_default():
    models = registry()
    assert models.resolve("smollm2").name == "SmolLM2-135M-Instruct"
    assert models.resolve("Qwen0_5b").name == "Qwen2.5-0.5B-Instruct"
    assert models.resolve(None) is models.default is models.models[0]
    assert models.resolve("").name == "SmolLM2-135M-Instruct"


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(
        UnknownModelError,
        match="model 'gpt-9' is not served here; available models: SmolLM2-135M-Instruct, Qwen2.5-0.5B-Instruct",
    ):
        registry().resolve("gpt-9")


def test_a_name_configured_twice_is_rejected():
    with pytest.raises(ValueError, match="'smollm2' is configured twice"):
        ModelRegistry([ModelConfig(name="a", aliases=["smollm2"]), ModelConfig(name="smollm2")])


def test_sources_are_parsed_by_kind_and_revision_follows_the_source():
    assert isinstance(ModelConfig(name="m").source, PackagedGGUFSource)
    assert isinstance(ModelConfig(name="m", source={"kind": "tiny_random"}).source, TinyRandomSource)
    hub = ModelConfig(name="m", source={"kind": "hf", "repo_id": "org/model", "revision": "abc"})
    assert isinstance(hub.source, HubSource) and hub.revision == "abc"
    assert ModelConfig(name="m").revision == "main"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "m", "device": "tpu"}, "Input should be 'auto', 'cpu', 'cuda' or 'mps'"),
        ({"name": "m", "dtype": "int4"}, "Input should be 'float32', 'bfloat16' or 'float16'"),
        ({"name": "m", "source": {"kind": "ftp"}}, "does not match any of the expected tags"),
        ({"name": "m", "context_length": 0}, "greater than 0"),
        ({"name": "m", "colour": "red"}, "Extra inputs are not permitted"),
        ({"name": "has space"}, "String should match pattern"),
    ],
)
def test_bad_model_config_is_rejected_with_a_message(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**fields)


def test_auto_settings_resolve_per_device_and_cpu_formats_are_refused_on_a_gpu():
    packaged = ModelConfig(name="p")
    hub = ModelConfig(name="h", source={"kind": "hf", "repo_id": "org/model"})
    assert [packaged.resolved_weights(d) for d in ("cuda", "mps", "cpu")] == ["bf16", "fp16", "int4"]
    assert hub.resolved_weights("cpu") == "int8"
    assert hub.resolved_weights("cpu", has_fast_int8=False) == "fp32"  # no VNNI: int8 would be slower
    # Chunk coalescing: (per stream, per replica) rates by device; a configured rate is kept as it is.
    assert [packaged.resolved_chunks_per_s(d) for d in ("cpu", "cuda", "mps")] == [(20.0, 150.0), (40.0, 1000.0), (20.0, 150.0)]
    assert packaged.model_copy(update={"replica_chunks_per_s": 60.0}).resolved_chunks_per_s("cuda") == (40.0, 60.0)
    assert packaged.model_copy(update={"stream_chunks_per_s": 60.0}).resolved_chunks_per_s("cpu") == (60.0, 150.0)
    with pytest.raises(ValueError, match="model 'g': weights 'int8' run on the CPU only, not on device 'cuda'"):
        ModelConfig(name="g", device="cuda", weights="int8")
    with pytest.raises(ValueError, match="weights 'int4' run on the CPU only, not on device 'cuda'"):
        ModelConfig(name="a", weights="int4").resolved_weights("cuda")


def test_only_an_autoscaled_model_with_min_replicas_zero_may_scale_to_zero():
    def model(**fields) -> ModelConfig:
        return ModelConfig(name="m", source={"kind": "tiny_random"}, **fields)

    assert model(autoscaling_config={"min_replicas": 0, "max_replicas": 2}).may_scale_to_zero
    assert not model(autoscaling_config={"min_replicas": 1, "max_replicas": 2}).may_scale_to_zero
    assert not model(autoscaling_config={"max_replicas": 2}).may_scale_to_zero  # Serve's default: 1
    assert not model(num_replicas=2).may_scale_to_zero and not model(num_replicas="auto").may_scale_to_zero


def test_the_requests_a_caller_may_have_in_flight_before_serve_refuses_the_next():
    tiny = {"name": "m", "source": {"kind": "tiny_random"}, "max_ongoing_requests": 8, "max_queued_requests": 4}
    assert ModelConfig(**tiny, num_replicas=2).max_in_flight == 8 * 2 + 4
    assert ModelConfig(**tiny, autoscaling_config={"min_replicas": 0, "max_replicas": 3}).max_in_flight == 8 * 3 + 4
    assert ModelConfig(**tiny, num_replicas="auto").max_in_flight is None
    assert ModelConfig(**{**tiny, "max_queued_requests": -1}).max_in_flight is None  # an unbounded queue
