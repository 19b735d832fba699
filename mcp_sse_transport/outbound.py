"""What an SDK server writes: each message one granted event on its session's stream, and the
reports that reach the client when a message cannot be sent or a POST cannot be read."""

from __future__ import annotations

import json
import logging
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._sdk import (
    Message,
    SessionMessage,
    ValidationError,
    answered_id,
    dump,
    jsonrpc_error,
    message_of,
    serialize,
    session_message,
    types,
)
from .errors import ErrorCode, EventTooLargeError
from .events import error_body
from .session import Session, Stream

if TYPE_CHECKING:
    from .ledger import RequestLedger

__all__ = [
    "CLOSED",
    "ServerWriteStream",
    "id_too_long",
    "id_too_long_answer",
    "id_too_long_error",
    "report_id_too_long",
    "report_parse_error",
]

logger = logging.getLogger("mcp_sse_transport")

CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)
"""What sending into a session that ended raises."""


class ServerWriteStream:
    """The write stream the SDK server writes to: each message becomes one granted event."""

    __slots__ = ("_ledger", "_session", "_task_group")

    def __init__(self, session: Session, task_group: anyio.abc.TaskGroup, ledger: RequestLedger) -> None:
        self._session = session
        self._task_group = task_group
        self._ledger = ledger

    async def send(self, item: SessionMessage, /) -> None:
        message = message_of(item)
        self._session.exchanged = True
        answered = answered_id(message)
        if answered is not None and answered == self._session.swallow:
            self._session.swallow = None  # the replayed initialize's: the client has it already
            return
        routing = self._session.routing
        stream = routing.stream_for(item)
        try:
            try:
                data = serialize(message)
            except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
                await self._report(stream, message, _Unsendable.unserializable(exc))
            else:
                try:
                    await stream.send(data)
                except EventTooLargeError as exc:
                    await self._report(stream, message, _Unsendable.too_large(exc))
        finally:
            if answered is not None:  # sent, or its stream broke: either way the request is settled
                routing.answered(answered, stream)
        if answered is not None:
            await self._ledger.answered(self._session, stream, answered)

    async def _report(self, stream: Stream, message: Message, why: _Unsendable) -> None:
        await _report_unsendable(self._session, stream, self._task_group, message, why)

    async def aclose(self) -> None:
        await self._session.handler.close()

    async def __aenter__(self) -> ServerWriteStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _answer_locally(session: Session, answer: types.JSONRPCError) -> None:
    """Hand the server an answer to its own request, from a task of its own: the server may be
    reading in the very task that wrote the request. Dropped if it stops reading."""
    with anyio.move_on_after(session.handler.config.grant_timeout), suppress(*CLOSED):
        await session.inbound.send(session_message(answer))


@dataclass(frozen=True, slots=True)
class _Unsendable:
    """Why an outbound message could not be sent, as its error event and answers say it."""

    code: ErrorCode
    problem: str
    """Completes "Outbound message …", "Response …", "Request …"."""
    cause: Exception
    data: dict[str, Any]

    @classmethod
    def unserializable(cls, exc: Exception) -> _Unsendable:
        return cls(ErrorCode.INTERNAL_ERROR, "could not be serialized", exc, {})

    @classmethod
    def too_large(cls, exc: EventTooLargeError) -> _Unsendable:
        return cls(ErrorCode.MESSAGE_TOO_LARGE, "is too large", exc, {"size": exc.size, "max_event_bytes": exc.limit})


async def _report_unsendable(
    session: Session,
    handler: Stream,
    task_group: anyio.abc.TaskGroup,
    message: Message,
    why: _Unsendable,
) -> None:
    """Tell the client which message was lost, on the stream it was for, and answer whoever
    waits for it, on either side."""
    request_id = getattr(message, "id", None)
    method = getattr(message, "method", None)
    logger.error(
        "session %s: outbound %s %s (%s); the session goes on",
        handler.tag,
        type(message).__name__,
        why.problem,
        why.cause,
        exc_info=why.cause if why.code is ErrorCode.INTERNAL_ERROR else None,
    )
    details = {key: value for key, value in (("id", request_id), ("method", method)) if value is not None}
    try:
        await handler.send(
            error_body(why.code, f"Outbound message {why.problem}", {**details, **why.data} or None), event="error"
        )
        if isinstance(message, types.JSONRPCResponse):
            await handler.send(dump(jsonrpc_error(message.id, f"Response {why.problem}", why.code)))
        elif isinstance(message, types.JSONRPCError):
            replacement = types.ErrorData(code=message.error.code, message=message.error.message)
            await handler.send(dump(types.JSONRPCError(jsonrpc="2.0", id=message.id, error=replacement)))
        elif isinstance(message, types.JSONRPCRequest):
            # The server awaits the client's answer to a request the client never got: answer it.
            task_group.start_soon(
                _answer_locally, session, jsonrpc_error(message.id, f"Request {why.problem}", why.code)
            )
    except CLOSED:
        logger.debug("session %s: ended before the failed send could be reported", handler.tag)


def id_too_long_error(limit: int) -> str:
    """The error object for a request id over ``max_request_id_bytes``."""
    return error_body(ErrorCode.INVALID_REQUEST, "Request id too long", {"max_request_id_bytes": limit})


def id_too_long(message: Message, limit: int) -> bool:
    """Whether ``message`` is a request whose id, as JSON, is longer than ``limit`` bytes."""
    return isinstance(message, types.JSONRPCRequest) and len(json.dumps(message.id)) > limit


def id_too_long_answer(limit: int) -> str:
    """The JSON-RPC error a POST of a request with a too-long id gets: ``id`` is null, since the
    id is not echoed (nor remembered)."""
    return f'{{"jsonrpc":"2.0","id":null,"error":{id_too_long_error(limit)}}}'


async def report_id_too_long(session: Session) -> None:
    """The too-long-id error on the stream, for clients that drop a POST's answer."""
    with suppress(*CLOSED):
        await session.handler.send(id_too_long_error(session.handler.config.max_request_id_bytes), event="error")


def _id_of(body: bytes) -> types.RequestId | None:
    """The JSON-RPC id of a POSTed body that is JSON but not a valid message, if it names one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or "method" not in parsed:
        return None
    request_id = parsed.get("id")
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None


async def report_parse_error(session: Session, body: bytes, err: ValidationError) -> None:
    """Put a parse failure on the stream as well as on the 400: stock clients drop a POST's
    status, and a caller whose request was malformed would otherwise wait forever."""
    request_id = _id_of(body)
    try:
        await session.inbound.send(err)  # as stock does; the server logs and drops it
        await session.handler.send(
            error_body(
                ErrorCode.PARSE_ERROR,
                "Could not parse message",
                {"id": request_id} if request_id is not None else None,
            ),
            event="error",
        )
        if request_id is not None:
            await session.handler.send(dump(jsonrpc_error(request_id, "Invalid request", ErrorCode.INVALID_REQUEST)))
    except CLOSED:
        logger.debug("session %s: ended before the parse error could be reported", session.handler.tag)
