"""Ray Serve shell around `LLMServer`: one deployment per configured model (the builder names
it after the model). It only forwards; everything it does is testable without Ray. A request's
outputs but the last go straight to the ingress replica that asked (`output_channel`); the call
returns the last. A model of one replica also takes the ingress replicas' calls on a connection
beside Serve (`call_channel`)."""

from __future__ import annotations

import math
from pathlib import Path

import ray
from ray import serve

from deployments.call_channel import CallServer
from deployments.engine.protocol import Delivered, EngineStats, GenerationRequest, InvalidRequestError, TokenizeRequest
from deployments.logs import show_our_logs
from deployments.model_registry import ModelConfig
from deployments.output_channel import Outbox, deliver


@serve.deployment
class LLMDeployment:
    def __init__(self, config: ModelConfig, cache_dir: Path | None):
        show_our_logs()
        self.channel = CallServer(self, f"model '{config.name}'")  # first: `__del__` stops it, whatever fails next
        # Imported here: torch and transformers load only in model replicas, not in the
        # application builder or the ingress that import this module (seconds and ~300 MB each).
        from deployments.llm_server import LLMServer

        self.server = LLMServer(config, cache_dir)
        self.outbox = Outbox()

    async def address(self) -> tuple[str, int, str] | None:
        """Where callers reach this replica beside Serve (`CallClient`), on its node's address;
        None once stopping. Started on the first call: only a model of one replica is called
        so (`ModelConfig.has_one_replica`)."""
        await self.channel.start_once(ray.util.get_node_ip_address())
        return self.channel.address()

    async def __del__(self) -> None:
        # Serve's graceful shutdown awaits it once its own calls have ended: the callers on the
        # channel make their next calls through Serve, and the answers under way end, before the
        # replica goes (Serve ends it after `graceful_shutdown_timeout_s` whatever is left).
        await self.channel.stop(timeout_s=math.inf)

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
