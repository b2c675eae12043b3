"""Ray Serve shell around `LLMServer`: one deployment per configured model (the builder names
it after the model). It only forwards; everything it does is testable without Ray. A request's
outputs but the last go straight to the ingress replica that asked (`output_channel`); the call
returns the last."""

from __future__ import annotations

from pathlib import Path

from ray import serve

from deployments.engine.protocol import Delivered, EngineStats, GenerationRequest, InvalidRequestError, TokenizeRequest
from deployments.logs import show_our_logs
from deployments.model_registry import ModelConfig
from deployments.output_channel import Outbox, deliver


@serve.deployment
class LLMDeployment:
    def __init__(self, config: ModelConfig, cache_dir: Path | None):
        show_our_logs()
        # Imported here: torch and transformers load only in model replicas, not in the
        # application builder or the ingress that import this module (seconds and ~300 MB each).
        from deployments.llm_server import LLMServer

        self.server = LLMServer(config, cache_dir)
        self.outbox = Outbox()

    async def generate(self, request: GenerationRequest) -> Delivered:
        if request.reply_to is None:
            raise InvalidRequestError("a generation request needs reply_to: where its outputs go")
        return await deliver(self.server.generate(request), self.outbox, request.reply_to)

    def cancel(self, request_id: str) -> bool:
        return self.server.cancel(request_id)

    def stats(self) -> EngineStats:
        return self.server.stats()

    def tokenize(self, request: TokenizeRequest) -> tuple[list[int], int]:
        return self.server.tokenize(request)

    def detokenize(self, tokens: list[int]) -> str:
        return self.server.detokenize(tokens)
