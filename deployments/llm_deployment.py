"""Ray Serve shell around `LLMServer`: one deployment per configured model (the builder names
it after the model). It only forwards; everything it does is testable without Ray."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from deployments.engine.protocol import EngineStats, GenerationOutput, GenerationRequest
from deployments.logs import show_our_logs
from deployments.model_registry import ModelConfig


@serve.deployment
class LLMDeployment:
    def __init__(self, config: ModelConfig, cache_dir: Path | None):
        show_our_logs()
        # Imported here: torch and transformers load only in model replicas, not in the
        # application builder or the ingress that import this module (seconds and ~300 MB each).
        from deployments.llm_server import LLMServer

        self.server = LLMServer(config, cache_dir)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        async for output in self.server.generate(request):
            yield output

    def cancel(self, request_id: str) -> bool:
        return self.server.cancel(request_id)

    def stats(self) -> EngineStats:
        return self.server.stats()
