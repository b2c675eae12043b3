"""The original API's routes: the served models (`/models`) and conversations (`/conversations`:
create, list, read, rename, export, delete, and generate / regenerate / stop an answer, streamed
as plain text). Each route hands its request to a service: history access to
`serve_app.conversations`, answers to `serve_app.turns`; errors become HTTP responses in
`serve_app.errors`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from serve_app.auth import CALLER, Caller, PermissionDeniedError
from serve_app.conversations import ConversationService, conversation_markdown, parse_conversation_id
from serve_app.protocol import (
    Conversation,
    ConversationSummary,
    ExportFormat,
    GenerateRequest,
    ModelCard,
    RegenerateRequest,
    RenameRequest,
    StopResponse,
)
from serve_app.served_models import ServedModels
from serve_app.streaming import TextStreamResponse
from serve_app.turns import StreamLease, TurnService


def create_models_router(models: ServedModels) -> APIRouter:
    router = APIRouter(tags=["models"])

    @router.get("/models")
    async def list_models() -> list[ModelCard]:
        registry = models.registry
        return [
            ModelCard(name=m.name, aliases=list(m.aliases), revision=m.revision, is_default=m is registry.default)
            for m in registry.models
        ]

    return router


def _conversation_links(conversation_id: str) -> dict[str, Any]:
    """OpenAPI links from a route that creates or answers in a conversation to the routes that take
    its id (`conversation_id`: where the id is), so client generators and schema-driven tests
    (tests/e2e/test_fuzz.py) chain the calls."""
    targets = {
        "get": "/get",
        "rename": "/patch",
        "delete": "/delete",
        "export": "~1export/get",
        "generate": "~1generate/post",
        "regenerate": "~1regenerate/post",
        "stop": "~1stop/post",
    }
    path_item = "#/paths/~1conversations~1{conversation_id}"
    return {
        name: {"operationRef": path_item + target, "parameters": {"conversation_id": conversation_id}}
        for name, target in targets.items()
    }


def _streamed_answer(description: str) -> dict[str, Any]:
    """The route options of a route that streams an answer in a conversation as plain text."""
    links = _conversation_links("$request.path.conversation_id")
    return {"response_class": TextStreamResponse, "responses": {200: {"description": description, "links": links}}}


def create_conversations_router(conversations: ConversationService) -> APIRouter:
    """The `/conversations` routes that read and edit the history. `/conversations/start` comes
    before the routes of `/conversations/{conversation_id}`, which would match it too."""
    router = APIRouter(prefix="/conversations", tags=["conversations"])

    @router.get("", response_model=list[int] | list[ConversationSummary])
    async def list_conversations(detail: bool = False, all: bool = False, caller: Caller = CALLER):
        """Ids of the caller's conversations, oldest first (the original's answer); with
        `?detail=true`, each one's id, title and timestamps, most recently active first. With
        `auth: users`, `?all=true` lists every user's (admins only)."""
        if all and not caller.admin:
            raise PermissionDeniedError("all: only an admin may list every user's conversations")
        owner = None if all else caller.owner
        return await conversations.list_summaries(owner) if detail else await conversations.list_ids(owner)

    @router.get("/start", responses={200: {"links": _conversation_links("$response.body")}})
    async def start_conversation(caller: Caller = CALLER) -> int:
        """Creates a conversation and returns its id (a bare JSON number)."""
        return (await conversations.create(caller.owner)).id

    @router.post("", status_code=201, responses={201: {"links": _conversation_links("$response.body#/id")}})
    async def create_conversation(caller: Caller = CALLER) -> ConversationSummary:
        return await conversations.create(caller.owner)

    @router.get("/{conversation_id}")
    async def get_conversation(conversation_id: str, caller: Caller = CALLER) -> Conversation:
        return await conversations.get(conversation_id, caller.owner)

    @router.patch("/{conversation_id}")
    async def rename_conversation(conversation_id: str, body: RenameRequest, caller: Caller = CALLER) -> ConversationSummary:
        return await conversations.rename(conversation_id, body.title, caller.owner)

    @router.get("/{conversation_id}/export", responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
    async def export_conversation(conversation_id: str, format: ExportFormat = "json", caller: Caller = CALLER) -> Response:
        """The whole conversation as a downloadable JSON document or Markdown transcript."""
        conversation = await conversations.get(conversation_id, caller.owner)
        if format == "markdown":
            body, media_type, suffix = conversation_markdown(conversation), "text/markdown; charset=utf-8", "md"
        else:
            body, media_type, suffix = conversation.model_dump_json(indent=2), "application/json", "json"
        disposition = f'attachment; filename="conversation-{conversation.id}.{suffix}"'
        return Response(body, media_type=media_type, headers={"Content-Disposition": disposition})

    @router.delete("/{conversation_id}")
    async def delete_conversation(conversation_id: str, caller: Caller = CALLER) -> dict[str, int | bool]:
        return {"id": await conversations.delete(conversation_id, caller.owner), "deleted": True}

    return router


def create_answers_router(models: ServedModels, turns: TurnService, leases: Any) -> APIRouter:
    """The `/conversations/{conversation_id}` routes that answer in a conversation: generate,
    regenerate and stop. `leases`: the dependency that gives a generation its stream lease
    (`ingress.create_app`)."""
    router = APIRouter(prefix="/conversations", tags=["conversations"])

    @router.post("/{conversation_id}/generate", **_streamed_answer("The answer, streamed as it is generated."))
    async def generate(
        conversation_id: str, body: GenerateRequest, caller: Caller = CALLER, lease: StreamLease | None = leases
    ) -> TextStreamResponse:
        """Appends `prompt` to the conversation and streams the model's answer as plain text."""
        model = models.resolve(body.model, body.revision)
        turn = await turns.conversation_turn(
            conversation_id,
            caller.owner,
            [{"role": "user", "content": body.prompt}],
            model,
            body.to_sampling_params(),
            body.stored_parameters(model.name, model.revision),
            lease,
        )
        return TextStreamResponse(turns.text_pieces(turn))

    @router.post("/{conversation_id}/regenerate", **_streamed_answer("The new answer, streamed."))
    async def regenerate(
        conversation_id: str,
        body: RegenerateRequest | None = None,
        caller: Caller = CALLER,
        lease: StreamLease | None = leases,
    ) -> TextStreamResponse:
        """Answers the last prompt again (optionally with other parameters or another model);
        the new answer replaces the previous one once it is complete or stopped."""
        body = body or RegenerateRequest()
        model = models.resolve(body.model, body.revision)
        turn = await turns.regenerate_turn(
            conversation_id,
            caller.owner,
            model,
            body.to_sampling_params(),
            body.stored_parameters(model.name, model.revision),
            lease,
        )
        return TextStreamResponse(turns.text_pieces(turn))

    @router.post("/{conversation_id}/stop")
    async def stop(conversation_id: str, caller: Caller = CALLER) -> StopResponse:
        """Stops the answer being generated in this conversation within one decode step; the
        partial answer is stored with status "stopped"."""
        stopped = await turns.stop(conversation_id, caller.owner)
        return StopResponse(id=parse_conversation_id(conversation_id), stopped=stopped)

    return router
