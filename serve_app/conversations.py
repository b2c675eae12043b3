"""The conversation endpoint family (the original API): turns protocol requests into calls on
the history deployment and the model deployments, and relays the model's text back while
recording the turn.

A turn is recorded as two final rows: the user's prompt once the model has produced its first
output (so a rejected request stores nothing), and the answer once the stream ends, with status
`complete`, `stopped` (client gone / stop) or `failed` (error text kept).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.engine import GenerationOutput
from deployments.history_store import ConversationNotFoundError
from deployments.llm_server import ChatRequest
from deployments.model_registry import ModelConfig, ModelRegistry
from serve_app.protocol import Conversation, ConversationSummary, GenerateRequest, Message, MessageStatus

logger = logging.getLogger(__name__)


class UnknownRevisionError(LookupError):
    def __init__(self, model: ModelConfig, requested: str):
        super().__init__(
            f"model '{model.name}' is served at revision '{model.revision}', not '{requested}'; "
            "omit `revision` or ask for the served one"
        )


def parse_conversation_id(raw: str) -> int:
    """Ids are positive integers; anything else names no conversation (404, not 422)."""
    if not raw.isascii() or not raw.isdigit():
        raise ConversationNotFoundError(raw)
    return int(raw)


def context_messages(history: list[Message]) -> list[dict[str, str]]:
    """The earlier turns the model sees: each user message with the answer that followed it.
    Unanswered prompts and empty (failed) answers are left out so roles keep alternating."""
    turns: list[dict[str, str]] = []
    for prompt, answer in zip(history, history[1:]):
        if prompt.role == "user" and answer.role == "assistant" and answer.content:
            turns += [{"role": "user", "content": prompt.content}, {"role": "assistant", "content": answer.content}]
    return turns


def conversation_markdown(conversation: Conversation) -> str:
    """A readable transcript: title, then each message under its speaker."""
    lines = [f"# {conversation.title or f'Conversation {conversation.id}'}", ""]
    for message in conversation.messages:
        speaker = "User" if message.role == "user" else f"Assistant ({message.model})" if message.model else "Assistant"
        note = "" if message.status == "complete" else f" — {message.status}"
        lines += [f"## {speaker}{note}", ""]
        if message.content:
            lines += [message.content, ""]
        if message.error:
            lines += [f"> error: {message.error}", ""]
    return "\n".join(lines)


class ConversationService:
    def __init__(self, registry: ModelRegistry, models: dict[str, DeploymentHandle], history: DeploymentHandle):
        self.registry = registry
        self.models = models
        self.history = history

    async def model_states(self, timeout_s: float = 1.0) -> dict[str, str]:
        """'ready' for each model whose deployment answers within `timeout_s`, else 'loading'."""

        async def state(handle: DeploymentHandle) -> str:
            try:
                await asyncio.wait_for(handle.stats.remote(), timeout_s)
                return "ready"
            except (asyncio.TimeoutError, RayError):
                return "loading"

        names = list(self.models)
        return dict(zip(names, await asyncio.gather(*(state(self.models[name]) for name in names))))

    async def list_ids(self) -> list[int]:
        return await self.history.list_conversation_ids.remote()

    async def create(self) -> ConversationSummary:
        return await self.history.create_conversation.remote()

    async def get(self, raw_id: str) -> Conversation:
        return await self.history.get_conversation.remote(parse_conversation_id(raw_id))

    async def list_summaries(self) -> list[ConversationSummary]:
        return await self.history.list_conversations.remote()

    async def rename(self, raw_id: str, title: str) -> ConversationSummary:
        return await self.history.rename_conversation.remote(parse_conversation_id(raw_id), title)

    async def delete(self, raw_id: str) -> int:
        conversation_id = parse_conversation_id(raw_id)
        await self.history.delete_conversation.remote(conversation_id)
        return conversation_id

    def resolve_model(self, name: str | None, revision: str | None = None) -> ModelConfig:
        model = self.registry.resolve(name)
        if revision not in (None, "", model.revision):
            raise UnknownRevisionError(model, revision)
        return model

    async def generate(self, raw_id: str, body: GenerateRequest) -> AsyncIterator[str]:
        """Validates everything that can be wrong before the first byte, then returns the
        stream of text pieces. Errors raised here become 4xx responses."""
        conversation_id = parse_conversation_id(raw_id)
        model = self.resolve_model(body.model, body.revision)
        conversation = await self.get(raw_id)
        messages = context_messages(conversation.messages) + [{"role": "user", "content": body.prompt}]
        request = ChatRequest(messages=messages, params=body.to_sampling_params())
        stream: DeploymentResponseGenerator = self.models[model.name].options(stream=True).generate.remote(request)
        try:
            # The first output proves the prompt fits and the model runs (errors -> 4xx).
            first: GenerationOutput = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        parameters = body.stored_parameters(model.name, model.revision)
        await self.history.append_message.remote(conversation_id, "user", body.prompt, model=model.name, parameters=parameters)
        return self._relay(conversation_id, model, parameters, first, stream)

    async def _relay(
        self,
        conversation_id: int,
        model: ModelConfig,
        parameters: dict[str, Any],
        first: GenerationOutput,
        stream: DeploymentResponseGenerator,
    ) -> AsyncIterator[str]:
        pieces: list[str] = []
        status: MessageStatus = "complete"
        error: str | None = None
        output = first
        try:
            while True:
                if output.text:
                    pieces.append(output.text)
                    yield output.text
                if output.finish_reason is not None:
                    break
                output = await stream.__anext__()
        except StopAsyncIteration:
            pass
        except (asyncio.CancelledError, GeneratorExit):
            status = "stopped"
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is sent; keep what we have
            status, error = "failed", str(getattr(exc, "cause", None) or exc)
            logger.exception("generation failed in conversation %s", conversation_id)
        finally:
            if status != "complete":
                stream.cancel()
            # Shielded: the answer is stored even when the client's disconnect cancelled us.
            answer = dict(
                model=model.name, parameters=parameters, status=status, error=error,
                prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens,
            )
            await asyncio.shield(self._store_answer(conversation_id, "".join(pieces), answer))

    async def _store_answer(self, conversation_id: int, content: str, answer: dict[str, Any]) -> None:
        try:
            await self.history.append_message.remote(conversation_id, "assistant", content, **answer)
        except ConversationNotFoundError:
            logger.info("conversation %s was deleted while answering; answer dropped", conversation_id)
