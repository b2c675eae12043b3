"""Generation turns, shared by both APIs: a request becomes a call on a model deployment (its
place among the model's requests taken first), and the model's outputs are relayed back while
the turn is recorded.

A stored turn is two final rows: the user's prompt once the model has produced its first output
(so a rejected request stores nothing), and the answer once the stream ends, with status
`complete`, `stopped` (client gone / stop) or `failed` (error text kept). From its start until
its answer is stored a turn holds a claim on its conversation in the history deployment
(`deployments.turn_claims`): one answer at a time, whichever ingress replica relays it. With
`auth: users` a generation request also holds a lease on one of its user's streams
(`StreamLease`) until its last answer ends. Reading or editing a conversation outside a turn is
`serve_app.conversations`; how an answer is framed on the wire is each API's (`text_pieces` is
the original API's plain text, `serve_app.serving_*` OpenAI's).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.call_channel import DeploymentHandleLike, ReplicaLostError
from deployments.engine.protocol import GenerationOutput, GenerationRequest, InvalidRequestError
from deployments.engine.sampling_params import SamplingParams
from deployments.history_records import User
from deployments.history_store import ConversationNotFoundError, UnansweredCallError
from deployments.model_registry import ModelConfig, ModelRegistry
from deployments.output_channel import Inbox, ModelStream
from deployments.quotas import QuotaExceededError, Quotas
from deployments.turn_claims import TURN_LEASE_S
from deployments.user_accounts import key_hash
from serve_app.conversations import context_messages, parse_conversation_id, stored_prompts
from serve_app.metrics import ServiceMetrics
from serve_app.protocol import STREAM_ERROR_MARKER, Conversation, MessageStatus
from serve_app.served_models import answers_of, broadcast
from serve_app.tool_calls import Call, CallReader, call_stem

logger = logging.getLogger(__name__)

# The replica label of the turn metrics of a service driven alone (tests), not by Serve.
LOCAL_REPLICA = "local"


def describe_failure(exc: BaseException) -> str:
    """What to tell a user (and store with the answer) when a stream fails after it started:
    words, not Ray's internals."""
    cause = getattr(exc, "cause", None) or exc
    # ActorDiedError among the first; the second from a model called beside Serve (`call_channel`).
    if isinstance(cause, (RayActorError, ReplicaLostError)) or isinstance(exc, RayActorError):
        return "the model's replica stopped while answering (Serve is restarting it); send the prompt again shortly"
    return f"the answer failed: {cause}"


class ModelOverloadedError(RuntimeError):
    """The model's replicas are busy and its queue is full (503 with Retry-After)."""

    def __init__(self, model: ModelConfig):
        super().__init__(f"model '{model.name}' is overloaded (all replicas busy, queue full); retry shortly")


@dataclass
class TurnRecord:
    """Where and how a turn is stored; absent for requests that keep no history."""

    conversation_id: int
    parameters: dict[str, Any]
    # The turn's claim on the conversation (`deployments.turn_claims`), given back with the answer.
    claim: str
    # Regeneration: the prompt is stored already (this id); the answers after it are replaced.
    replace_after: int | None = None


@dataclass
class Turn:
    """A generation that has produced its first output: everything that can reject it did."""

    model: ModelConfig
    first: GenerationOutput
    stream: ModelStream
    record: TurnRecord | None
    # When the turn's claim on its conversation (and its request's lease) was taken or last
    # renewed (`time.monotonic()`).
    claim_renewed_at: float = 0.0
    lease: StreamLease | None = None
    # With tools: how the answer's calls are read back (None: it has none), and their ids' stem.
    calls: CallReader | None = None
    call_stem: str = dataclasses.field(default_factory=call_stem)

    def answer_calls(self, text: str, last: GenerationOutput) -> tuple[str | None, list[Call]]:
        """The answer's text that is not a call (None: calls only) and its calls, the same each
        time it is read (the client's and the stored)."""
        if self.calls is None:
            return text, []
        return self.calls.split(text, last.finish_reason == "stop", self.call_stem)


@dataclass
class StreamLease:
    """A generation request's place among its user's streams (`auth: users`: `deployments.quotas`),
    held until its last answer has ended, and the tokens its answers used."""

    user_id: int
    id: str
    label: str  # the user's label in the per-user metrics (`Quotas.metrics_label`)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    answers: int = 0  # its answers started and not ended
    ended: bool = False

    def count(self, last: GenerationOutput) -> bool:
        """Counts one answer as it ends (its last output); the `n` answers of a request read one
        prompt. True when it was the request's last one."""
        self.prompt_tokens = max(self.prompt_tokens, last.prompt_tokens)
        self.completion_tokens += last.completion_tokens
        self.answers -= 1
        return self.answers == 0


def turn_request_id(conversation_id: int) -> str:
    return f"conversation-{conversation_id}"


# A stateless completion's key: its opening, which a follow-up that extends the prompt keeps.
PROMPT_AFFINITY_CHARS = 256


def affinity_key(record: TurnRecord | None, messages: list[dict[str, Any]] | None, prompt: str | None) -> str:
    """What the model deployment's router keeps on one replica (where its prefix cache holds the
    earlier turns): a stored conversation by its id; a stateless chat by its messages up to the
    first user message, which every later turn repeats; a completion by its opening."""
    if record is not None:
        return turn_request_id(record.conversation_id)
    if messages:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages) - 1)
        return "chat:" + json.dumps(messages[: first_user + 1], sort_keys=True)
    return "prompt:" + (prompt or "")[:PROMPT_AFFINITY_CHARS]


class Admission:
    """A request's place among those an ingress replica has in flight to one model
    (`TurnService.admit`), given back once: when its generation's handle call ends, or
    when the request fails before that."""

    def __init__(self, in_flight: dict[str, int], model_name: str):
        self._in_flight, self._model_name, self._is_held = in_flight, model_name, True
        in_flight[model_name] += 1

    def release(self, *_: object) -> None:
        if self._is_held:
            self._is_held = False
            self._in_flight[self._model_name] -= 1

    @contextlib.contextmanager
    def held(self) -> Iterator[Admission]:
        """Releases it if the block fails (once started, a generation releases it when it ends)."""
        try:
            yield self
        except BaseException:
            self.release()
            raise


class HistoryWrites:
    """The history deployment's calls that a turn makes and no request may cancel: storing a
    prompt or an answer, and giving back or renewing a claim or a stream lease."""

    def __init__(self, history: DeploymentHandleLike):
        self.history = history
        self._pending: set[asyncio.Task] = set()

    def start(self, write: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> asyncio.Task:
        """`write(*args, **kwargs)` in a task that a disconnect does not cancel: it runs with an
        empty context, as Serve keeps the request in contextvars and cancels every handle call
        made under a cancelled request. The task is referenced until done (asyncio holds tasks
        only weakly); it is awaited shielded, or from inside another such task (the prompt's
        write, by the answer's)."""

        async def written() -> Any:
            return await write(*args, **kwargs)

        task = asyncio.create_task(written(), context=contextvars.Context())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def tell(self, method: str, *args: Any) -> asyncio.Task:
        """Calls `method` on the history deployment (a claim given back or renewed) in a task
        that may be left to run; a failure is logged, and the claim's lease makes up for it."""

        async def told() -> None:
            try:
                await getattr(self.history, method).remote(*args)
            except Exception:  # noqa: BLE001 - nobody waits for this call
                logger.warning("history.%s%s failed", method, args, exc_info=True)

        return self.start(told)


class TurnService:
    """The turn lifecycle: admitting a generation (its model's in-flight limit, its user's stream
    lease), claiming a stored conversation, starting the model's stream and waiting for its
    first output, relaying the outputs while renewing the claim, storing the prompt and the
    answer however the stream ends, stopping a conversation's answer, and the turn metrics."""

    def __init__(
        self,
        registry: ModelRegistry,
        models: dict[str, DeploymentHandle],
        history: DeploymentHandleLike,
        ingress: DeploymentHandle | None = None,
        inbox: Inbox | None = None,
        channels: Mapping[str, DeploymentHandleLike] | None = None,
    ):
        self.registry = registry
        self.models = models
        # The models whose generations go on a connection beside Serve (`call_channel`: those
        # of one replica); the others' through their handles.
        self.channels = channels or {}
        self.history = history
        self.writes = HistoryWrites(history)
        # The ingress deployment this service runs in, whose every replica counts the turns it
        # relays (None: driven alone, as in tests).
        self.ingress = ingress
        # Where the model replicas send this replica's outputs (`deployments.output_channel`);
        # the Ingress starts it on its node. One that is not started takes deliveries in-process (tests).
        self.inbox = inbox or Inbox()
        # Requests this replica has admitted for each model whose generation has not ended (`admit`).
        self.in_flight: dict[str, int] = {model.name: 0 for model in registry.models}
        self.metrics = ServiceMetrics()

    async def turn_metrics(self) -> dict[str, list[Metric]]:
        """Every ingress replica's turn metrics, by replica (`Ingress.turn_metrics`)."""
        if self.ingress is None:
            return {LOCAL_REPLICA: self.metrics.families()}
        return dict(await answers_of(self.ingress, "turn_metrics") or [])

    async def admit_user(self, key: str, streams: bool, quotas: Quotas) -> tuple[User, StreamLease | None] | None:
        """The user whose live key `key` is (None for an unknown or revoked one) and, for a
        generation request (`streams`), a lease on one of their streams, or `QuotaExceededError`
        (counted) over one of their limits: one history call, before any work is queued."""
        admitted = await self.history.admit_user.remote(key_hash(key), streams)
        if admitted is None:
            return None
        user, lease = admitted
        label = quotas.metrics_label(user.id, user.name)
        if isinstance(lease, QuotaExceededError):
            self.metrics.user_refused(label, lease.limit)
            raise lease
        return user, StreamLease(user.id, lease, label) if lease else None

    async def end_stream(self, lease: StreamLease) -> None:
        """Ends the request's stream, once, counting its tokens: when its last answer has ended,
        before the response's last bytes go out, so that the client's next request finds its
        place free (else when the request ends without an answer). The history call runs in a
        task that a client going away does not cancel."""
        if lease.ended:
            return
        lease.ended = True
        self.metrics.user_request_ended(lease.label, lease.prompt_tokens, lease.completion_tokens)
        await asyncio.shield(
            self.writes.tell("end_stream", lease.user_id, lease.id, lease.prompt_tokens, lease.completion_tokens)
        )

    # `owner`: the caller's user id (`auth: users`), whose conversations alone are found; None:
    # everyone's (`serve_app.auth.Caller.owner`).

    async def stop(self, raw_id: str, owner: int | None) -> bool:
        """Stops the conversation's running generation, on whichever replica runs it."""
        conversation = await self.history.get_conversation.remote(parse_conversation_id(raw_id), owner)
        answers = await broadcast(self.models, "cancel", turn_request_id(conversation.id))
        return any(any(per_replica) for per_replica in answers.values())

    def admit(self, model: ModelConfig) -> Admission:
        """A place among the requests this replica has in flight to `model`, or
        `ModelOverloadedError` at once where Serve would refuse the next one anyway
        (`ModelConfig.max_in_flight`), before the request does any work. Under a burst, every
        turn used to claim its conversation in the history and wait for the model's queue
        before Serve refused it, so the refused ones waited long for their 503
        (docs/performance.md)."""
        limit = model.max_in_flight
        if limit is not None and self.in_flight[model.name] >= limit:
            raise ModelOverloadedError(model)
        return Admission(self.in_flight, model.name)

    async def conversation_turn(
        self,
        raw_id: str | int,
        owner: int | None,
        new_messages: list[dict[str, Any]],
        model: ModelConfig,
        params: SamplingParams,
        stored_parameters: dict[str, Any],
        lease: StreamLease | None = None,
        tools: list[dict[str, Any]] | None = None,
        calls: CallReader | None = None,
    ) -> Turn:
        """A turn in a stored conversation: its history goes before `new_messages`, whose last
        message (the user's), or last tool results (answering the calls the conversation's last
        answer made), are stored with the answer."""
        with self.admit(model).held() as admission:
            prompts = stored_prompts(new_messages)
            try:
                conversation, claim = await self._claim(raw_id, owner, prompts, model.name, stored_parameters)
            except UnansweredCallError as exc:
                unanswered = getattr(exc, "cause", None) or exc  # through Ray: a RayTaskError with the original
                first = len(new_messages) - len(prompts)
                raise InvalidRequestError(f"messages.{first + unanswered.index}.tool_call_id: {unanswered}") from None
            record = TurnRecord(conversation.id, stored_parameters, claim)
            messages = context_messages(conversation.messages) + new_messages
            return await self.start_turn(
                model, params, messages=messages, tools=tools, record=record, admission=admission, lease=lease, calls=calls
            )

    async def regenerate_turn(
        self,
        raw_id: str,
        owner: int | None,
        model: ModelConfig,
        params: SamplingParams,
        stored_parameters: dict[str, Any],
        lease: StreamLease | None = None,
    ) -> Turn:
        """Answers the conversation's last prompt again; the new answer replaces the old one."""
        with self.admit(model).held() as admission:
            conversation, claim = await self._claim(raw_id, owner)
            prompts = [i for i, m in enumerate(conversation.messages) if m.role == "user"]
            if not prompts:
                await asyncio.shield(self.writes.tell("end_turn", conversation.id, claim))
                raise InvalidRequestError(f"conversation '{conversation.id}' has no prompt to answer again")
            last = conversation.messages[prompts[-1]]
            record = TurnRecord(conversation.id, stored_parameters, claim, replace_after=last.id)
            messages = context_messages(conversation.messages[: prompts[-1]]) + [{"role": "user", "content": last.content}]
            return await self.start_turn(model, params, messages=messages, record=record, admission=admission, lease=lease)

    async def _claim(
        self,
        raw_id: str | int,
        owner: int | None,
        prompts: list[dict[str, Any]] | None = None,
        model: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> tuple[Conversation, str]:
        """The conversation as it was, claimed for a new turn (`ConversationBusyError` while it
        answers), and the claim, which the turn's answer gives back when it is stored. The
        history stores `prompts` in the same call, not waiting for the write (`begin_turn`):
        a call of their own cost the ingress and the history ~1 ms of CPU each a turn."""
        claim = uuid.uuid4().hex
        conversation = await self.history.begin_turn.remote(
            parse_conversation_id(raw_id), claim, owner, prompts, model=model, parameters=parameters
        )
        return conversation, claim

    async def start_turn(
        self,
        model: ModelConfig,
        params: SamplingParams,
        *,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        record: TurnRecord | None = None,
        admission: Admission | None = None,
        lease: StreamLease | None = None,
        calls: CallReader | None = None,
    ) -> Turn:
        """Starts generating and waits for the first output, so every error that can reject the
        request (prompt too long, model down) is raised here, before any byte is sent. Its place
        among the model's requests (`admit`; taken here unless given) is held until the
        generation ends. `calls`: how the answer's calls are read (with `tools`)."""
        admission = admission or self.admit(model)
        request = GenerationRequest(
            messages=messages,
            prompt=prompt,
            tools=tools,
            params=params,
            request_id=turn_request_id(record.conversation_id) if record else None,
            affinity_key=affinity_key(record, messages, prompt),
        )
        started = time.monotonic()
        try:
            stream, first = await self._first_output(model, request, admission)
        except BaseException:
            admission.release()
            if record is not None:  # given back (its prompt taken back) before the error is answered: a retry finds it free
                await asyncio.shield(self.writes.tell("end_turn", record.conversation_id, record.claim))
            raise
        self.metrics.turn_started(model.name, time.monotonic() - started)
        if lease is not None:
            lease.answers += 1
        return Turn(model, first, stream, record, claim_renewed_at=started, lease=lease, calls=calls)

    async def _first_output(
        self, model: ModelConfig, request: GenerationRequest, admission: Admission
    ) -> tuple[ModelStream, GenerationOutput]:
        """The model's stream for `request` and its first output (the stream cancelled if that
        fails); the admission is released when the handle call ends."""
        generate = (self.channels.get(model.name) or self.models[model.name]).generate
        stream = self.inbox.stream(lambda reply_to: generate.remote(dataclasses.replace(request, reply_to=reply_to)))
        stream.call_ended.add_done_callback(admission.release)
        try:
            return stream, await stream.__anext__()
        except BackPressureError as exc:
            # Serve's own handler would answer in plain text; ours names the model.
            raise ModelOverloadedError(model) from exc
        except BaseException:
            stream.cancel()
            raise

    async def outputs(self, turn: Turn) -> AsyncGenerator[GenerationOutput, None]:
        """The turn's outputs, first one included, ending with the one that has a finish
        reason; the answer is stored however the stream ends (complete, cancelled, failed)."""
        pieces: list[str] = []
        status: MessageStatus = "complete"
        error: str | None = None
        output = turn.first
        try:
            pieces.append(output.text)
            yield output
            if output.finish_reason is None:
                async for output in turn.stream:
                    pieces.append(output.text)
                    self._keep_claim(turn)
                    yield output
        except (asyncio.CancelledError, GeneratorExit):
            status = "stopped"
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent; record what we have
            status, error = "failed", describe_failure(exc)
            logger.exception("generation with model %s failed", turn.model.name)
            raise
        finally:
            if output.finish_reason == "cancelled":
                status = "stopped"
            self.metrics.turn_finished(turn.model.name, status, output.prompt_tokens, output.completion_tokens)
            if status != "complete":
                turn.stream.cancel()
            if turn.record is not None:
                text, calls = turn.answer_calls("".join(pieces), output)
                answer: dict[str, Any] = dict(
                    model=turn.model.name,
                    parameters=turn.record.parameters,
                    status=status,
                    error=error,
                    prompt_tokens=output.prompt_tokens,
                    completion_tokens=output.completion_tokens,
                    replace_after=turn.record.replace_after,
                    ends_turn=turn.record.claim,
                    tool_calls=[call.openai() for call in calls] or None,
                )
                await asyncio.shield(self.writes.start(self._store_answer, turn.record.conversation_id, text or "", answer))
            # Last: a cancelled request is cancelled again at each await here, and the answer comes first.
            if turn.lease is not None and turn.lease.count(output):
                await self.end_stream(turn.lease)

    async def abandon(self, turn: Turn) -> None:
        """Ends a started turn whose outputs no one will read (another choice of its request
        failed to start): its generation is cancelled and counted as stopped."""
        async with aclosing(self.outputs(turn)) as outputs:
            await anext(outputs)

    def _keep_claim(self, turn: Turn) -> None:
        """Renews the turn's claim on its conversation and its request's stream lease every third
        of their lease: an answer may stream for longer than one."""
        if (turn.record is None and turn.lease is None) or time.monotonic() - turn.claim_renewed_at <= TURN_LEASE_S / 3:
            return
        turn.claim_renewed_at = time.monotonic()
        if turn.record is not None:
            self.writes.tell("renew_turn", turn.record.conversation_id, turn.record.claim)
        if turn.lease is not None:
            self.writes.tell("renew_stream", turn.lease.user_id, turn.lease.id)

    async def text_pieces(self, turn: Turn) -> AsyncGenerator[str, None]:
        """The turn as plain text pieces (the original API's stream). A failure after the first
        piece ends the stream cleanly with `STREAM_ERROR_MARKER` and the reason on a line of its own."""
        try:
            async with aclosing(self.outputs(turn)) as outputs:
                async for output in outputs:
                    if output.text:
                        yield output.text
        except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
            yield f"\n{STREAM_ERROR_MARKER}{describe_failure(exc)}\n"

    async def _store_answer(self, conversation_id: int, content: str, answer: dict[str, Any]) -> None:
        try:
            # The history stores it after the turn's prompt (`begin_turn`).
            await self.history.append_message.remote(conversation_id, "assistant", content, **answer)
        except ConversationNotFoundError:  # the claim is given back all the same
            logger.info("conversation %s was deleted while answering; answer dropped", conversation_id)
