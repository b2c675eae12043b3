"""What the schemathesis CLI runs of tests/e2e/test_fuzz.py load (`SCHEMATHESIS_HOOKS`): every
generating request pointed at the tiny model with a few tokens, a check that streams end as
their protocol says, and one line per request (route, status, whether its id came from a link,
whether it was another user's) in the file named by `FUZZ_LEDGER`, from which the test counts
them. For the run as the wrong user (`auth: users`), `FUZZ_FOREIGN_IDS` names another user's
conversations, which half the requests that take an id are sent to, and `FUZZ_SECRET` what
those conversations hold, which no response may show."""

from __future__ import annotations

import json
import os
import random

import schemathesis

from serve_app.protocol import MAX_SAMPLE_LEN, STREAM_ERROR_MARKER

CHEAP_MODEL = "tiny-random"
CHEAP_TOKENS = 4
# The default (an empty name or none) and the packaged model are slow on a CPU; tiny-narrow takes
# one request at a time, so a new one may come while the last one's slot is being freed (a 503).
COSTLY_MODELS = {"", "SmolLM2-135M-Instruct", "smollm2", "tiny-narrow"}
LENGTH_FIELDS = ("sample_len", "max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
GENERATING_PATHS = {
    "/conversations/{conversation_id}/generate",
    "/conversations/{conversation_id}/regenerate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
}
FOREIGN_IDS = [int(part) for part in os.environ.get("FUZZ_FOREIGN_IDS", "").split(",") if part]
SECRET = os.environ.get("FUZZ_SECRET")
AIMED: set[int] = set()  # id() of the cases sent to a foreign id, until their answer is logged
# The Responses API's stream ends with the response's last state, not with `data: [DONE]`.
RESPONSE_ENDS = {"response.completed", "response.incomplete"}


def keep_generation_cheap(case: schemathesis.Case) -> None:
    """The packaged model would make the run minutes long, and routes, validation and engine are
    the same code for every model. A model name or length of the wrong type or out of range is
    left alone: that is what the negative cases test; one unknown model name in four is kept."""
    if case.method.upper() != "POST" or case.path not in GENERATING_PATHS:
        return
    if case.body is None and case.path.endswith("/regenerate"):  # no body: the packaged model
        case.body, case.media_type = {}, "application/json"
    if not isinstance(case.body, dict):
        return
    model, revision = case.body.get("model"), case.body.get("revision")
    if model is None or (isinstance(model, str) and (model in COSTLY_MODELS or len(model) % 4)):
        case.body["model"] = CHEAP_MODEL
    if isinstance(revision, str) and len(revision) % 4:  # any other than the served one is a 404
        del case.body["revision"]
    for field in LENGTH_FIELDS:
        value = case.body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and CHEAP_TOKENS < value <= MAX_SAMPLE_LEN:
            case.body[field] = CHEAP_TOKENS
    if all(case.body.get(field) is None for field in LENGTH_FIELDS[:4]):  # the defaults: 256 tokens, or the whole context
        case.body["sample_len" if case.path.startswith("/conversations/") else "max_tokens"] = CHEAP_TOKENS


def aim_at_foreign_ids(case: schemathesis.Case) -> None:
    """Half the requests that name a conversation name one of another user's instead."""
    if not FOREIGN_IDS or random.random() < 0.5:
        return
    if "conversation_id" in (case.path_parameters or {}):
        case.path_parameters["conversation_id"] = random.choice(FOREIGN_IDS)
        AIMED.add(id(case))
    elif case.path == "/v1/chat/completions" and isinstance(case.body, dict):
        case.body["conversation_id"] = random.choice(FOREIGN_IDS)
        AIMED.add(id(case))


@schemathesis.hook
def before_call(context, case: schemathesis.Case, kwargs: dict) -> None:
    keep_generation_cheap(case)
    aim_at_foreign_ids(case)


@schemathesis.hook
def after_call(context, case: schemathesis.Case, response: schemathesis.Response) -> None:
    if "FUZZ_LEDGER" in os.environ:
        # Generated ids are strings (the path parameter's type); ids from the schema's links are the
        # integers the app answered with.
        whose = "foreign" if id(case) in AIMED else "own"
        AIMED.discard(id(case))
        linked = whose == "own" and isinstance((case.path_parameters or {}).get("conversation_id"), int)
        with open(os.environ["FUZZ_LEDGER"], "a") as ledger:
            ledger.write(f"{case.operation.label}\t{response.status_code}\t{'linked' if linked else ''}\t{whose}\n")


@schemathesis.check
def streams_end_cleanly(ctx, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """An answer that started streaming ends as its protocol says: server-sent events with
    `data: [DONE]` (the Responses API's: with the response completed or incomplete) and no error
    event, the text stream without an `[error]` line."""
    if response.status_code != 200:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        if response.stream_cut_short:  # the client stopped reading, so how the stream ends is unknown
            raise AssertionError(
                "schemathesis stopped reading the event stream (at max-stream-events events or request-timeout seconds)"
            )
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        if case.path == "/v1/responses":
            kinds = [json.loads(event)["type"] for event in events]
            if not kinds or kinds[-1] not in RESPONSE_ENDS or "response.failed" in kinds:
                raise AssertionError(f"the response's event stream did not complete: {response.text[-300:]!r}")
            return True
        if not events or events[-1] != "[DONE]":
            raise AssertionError(f"the event stream does not end with `data: [DONE]`: {response.text[-300:]!r}")
        errors = [event for event in events[:-1] if "error" in json.loads(event)]
        if errors:
            raise AssertionError(f"the event stream failed: {errors}")
    elif content_type.startswith("text/plain") and case.path in GENERATING_PATHS and STREAM_ERROR_MARKER in response.text:
        raise AssertionError(f"the text stream failed: {response.text[-300:]!r}")
    return True


@schemathesis.check
def shows_no_other_users_content(ctx, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """No answer holds what another user's conversations hold (`FUZZ_SECRET`)."""
    if SECRET and SECRET in response.text:
        raise AssertionError(f"another user's content in the answer to {case.operation.label}: {response.text[:300]!r}")
    return True
