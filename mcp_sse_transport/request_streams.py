"""A Streamable HTTP session's streams, and which of them each server message goes to.

A session has one stream per POSTed request (its response stream: the request's own
notifications and requests, then its answer, which ends it) and the standalone stream a GET
reads (whatever belongs to no request). Each is a :class:`SessionHandler` of its own, with its
own buffer, grants, deadlines and replay log: a stalled stream stalls only the producers writing
to it. Routing is by the answered id, or the message's related request; nothing is broadcast.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import uuid4

import anyio
import anyio.lowlevel

from ._sdk import SessionMessage, answered_id, dump, jsonrpc_error, message_of, related_request_id, types
from .config import SseConfig
from .errors import ErrorCode, StoreError
from .events import encode_event
from .handler import SessionHandler
from .session import Stream
from .store import EventStore

__all__ = ["JsonReply", "SessionStreams", "TooManyStreams"]

logger = logging.getLogger("mcp_sse_transport")

Spawn = Callable[[Callable[[], Coroutine[Any, Any, object]]], None]
"""Starts a task in the session's task group."""


class TooManyStreams(Exception):
    """The session has ``max_session_streams`` streams open or kept for a resume."""


class JsonReply:
    """The stream of a request answered with a JSON body: it takes the answer and nothing else
    (a JSON body has no room for the request's notifications, which are dropped, as stock does)."""

    __slots__ = ("body", "ready", "tag")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.body: bytes | None = None
        self.ready = anyio.Event()

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None:
        await anyio.lowlevel.checkpoint()  # a producer sending again and again still yields
        if event == "message" and self.body is None:
            self.body = data.encode() if isinstance(data, str) else data
            self.ready.set()

    async def flush(self) -> None:
        pass


class _Nowhere:
    """Where a message for a stream that ended goes: dropped (stock drops them too)."""

    __slots__ = ("tag",)

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None:
        await anyio.lowlevel.checkpoint()  # a producer sending again and again still yields
        logger.debug("session %s: dropped a message for a stream that ended", self.tag)

    async def flush(self) -> None:
        pass


@dataclass(slots=True)
class _Request:
    request_id: types.RequestId
    stream: SessionHandler | JsonReply


def _key(request_id: types.RequestId) -> str:
    return json.dumps(request_id)


def interrupted(request_id: types.RequestId) -> bytes:
    """The answer a request gets when its response stream broke before its own answer."""
    error = jsonrpc_error(
        request_id,
        "The response stream broke before the answer; the request may or may not have taken effect",
        ErrorCode.REQUEST_INTERRUPTED,
    )
    return encode_event(dump(error), event="message")


class SessionStreams:
    """The :class:`~mcp_sse_transport.session.Routing` of a Streamable HTTP session."""

    def __init__(self, standalone: SessionHandler, store: EventStore, config: SseConfig, spawn: Spawn) -> None:
        self.standalone = standalone
        self._store = store
        self._config = config
        self._spawn = spawn
        self._requests: dict[str, _Request] = {}
        """Requests still waiting for their answer, by id (as JSON)."""
        self._streams: dict[str, SessionHandler] = {}
        """Response streams by stream id: open, or ended and kept ``session_grace`` for a resume."""
        self._nowhere = _Nowhere(standalone.tag)
        self.shutting_down = False
        """The server shuts down: a stream answered from now on ends with the shutdown event."""
        self.ending = False
        """The session is being ended (DELETE, shutdown): answers the server still writes go
        nowhere; the session's end answers every waiting request itself, with the reason."""

    @property
    def tag(self) -> str:
        return self.standalone.tag

    def __len__(self) -> int:
        return len(self._streams)

    # -- routing -----------------------------------------------------------------------------

    def stream_for(self, item: SessionMessage) -> Stream:
        answered = answered_id(message_of(item))
        target = answered if answered is not None else related_request_id(item)
        if target is None:
            # Neither an answer nor a request's own: the standalone stream (one that broke
            # raises its error, until a GET renews it).
            return self.standalone
        if self.ending and answered is not None:
            return self._nowhere
        entry = self._requests.get(_key(target))
        if entry is None and answered is None and isinstance(target, str):
            entry = self._named(target)
        if entry is None:  # answered already, or never ours
            return self._nowhere
        if isinstance(entry.stream, JsonReply) and answered is None:
            return self._nowhere  # a JSON body has room for the answer only
        # A stream that broke before the answer raises its error (SlowConsumerError, say) to
        # whoever still writes for the request: the producer learns the client is gone.
        return entry.stream

    def _named(self, related: str) -> _Request | None:
        """The request a server names by its id as a string: mcp 1.x's ``FastMCP`` and fastmcp (3
        and 4) relate progress and logs to ``str(request_id)``, and the SDK's 1.x transport keys
        streams so (requests ``7`` and ``"7"`` in flight at once: the first found)."""
        return next((entry for entry in self._requests.values() if str(entry.request_id) == related), None)

    def answered(self, request_id: types.RequestId, stream: Stream) -> None:
        entry = self._requests.get(_key(request_id))
        if entry is None or entry.stream is not stream:
            return
        del self._requests[_key(request_id)]
        if not isinstance(stream, SessionHandler):
            return
        if stream.ended:  # it broke before the answer: its epilogue answers a resume
            self._spawn(partial(self.retire, stream))
        else:
            stream.epilogue = None  # answered: a break from now on owes nobody an answer
            self._spawn(partial(self._finish, stream))

    # -- streams -------------------------------------------------------------------------------

    def open(self, request_id: types.RequestId) -> SessionHandler:
        """A response stream for ``request_id``, registered before the request reaches the
        server, so nothing it writes for the request is lost. Raises :class:`TooManyStreams`."""
        limit = self._config.max_session_streams
        if limit is not None and len(self._streams) >= limit:
            self._forget_oldest_ended()
            if len(self._streams) >= limit:
                raise TooManyStreams
        stream = SessionHandler(uuid4().hex, self._config, self._store, secret=self.standalone.secret)
        stream.epilogue = interrupted(request_id)
        self._streams[stream.session_id] = stream
        self._requests[_key(request_id)] = _Request(request_id, stream)
        return stream

    def waiting(self, request_id: types.RequestId) -> bool:
        """Whether a request of this id is still waiting for its answer."""
        return _key(request_id) in self._requests

    def open_json(self, request_id: types.RequestId) -> JsonReply:
        reply = JsonReply(self.tag)
        self._requests[_key(request_id)] = _Request(request_id, reply)
        return reply

    def withdraw(self, request_id: types.RequestId, reply: JsonReply) -> None:
        """The request never reached the server: nothing answers it through ``reply``."""
        entry = self._requests.get(_key(request_id))
        if entry is not None and entry.stream is reply:
            del self._requests[_key(request_id)]

    def find(self, stream_id: str) -> SessionHandler | None:
        """The stream a ``Last-Event-ID`` names (the standalone one's id is the session's)."""
        if stream_id == self.standalone.session_id:
            return self.standalone
        return self._streams.get(stream_id)

    def renew_standalone(self) -> SessionHandler:
        """A fresh standalone stream in place of one that ended (cut loose while nobody read
        it): the same replay log goes on, so ids the client saw still resume."""
        old = self.standalone
        self.standalone = SessionHandler(
            old.session_id, self._config, self._store, secret=old.secret, last_token=old.last_token
        )
        return self.standalone

    def unanswered(self) -> list[tuple[types.RequestId, SessionHandler | JsonReply]]:
        return [(entry.request_id, entry.stream) for entry in self._requests.values()]

    def open_streams(self) -> list[SessionHandler]:
        """Every stream that has not ended, the standalone one first."""
        return [stream for stream in (self.standalone, *self._streams.values()) if not stream.ended]

    async def drop_all(self) -> None:
        """The session ended: every response stream's log goes."""
        streams, self._streams = self._streams, {}
        for stream_id in streams:
            await self._drop_log(stream_id)

    async def _finish(self, stream: SessionHandler) -> None:
        """Drain an answered stream and end it; keep its log ``session_grace`` for a client cut
        off before it read everything, then drop it."""
        await (stream.shutdown() if self.shutting_down else stream.close())
        await self.retire(stream)

    async def retire(self, stream: SessionHandler) -> None:
        """Keep an ended stream resumable for ``session_grace``, then drop its log."""
        await anyio.sleep(self._config.session_grace)  # the resume window, not a wait on anything
        await self.drop(stream)

    async def drop(self, stream: SessionHandler) -> None:
        if self._streams.get(stream.session_id) is stream:
            del self._streams[stream.session_id]
        await self._drop_log(stream.session_id)

    async def _drop_log(self, stream_id: str) -> None:
        """Drop a stream's log; a store that fails to is logged (its own limits trim the log)."""
        try:
            await self._store.drop(stream_id)
        except StoreError as exc:
            logger.warning("session %s: a stream's log was not dropped (%s)", self.tag, exc)

    def _forget_oldest_ended(self) -> None:
        """Forget the oldest stream that ended with its answer; else the oldest that broke
        before it (a client is likelier to come back for that one)."""
        ended = [
            (stream.epilogue is not None, stream_id) for stream_id, stream in self._streams.items() if stream.ended
        ]
        if ended:
            _, stream_id = min(ended, key=lambda entry: entry[0])  # min is stable: the oldest of its kind
            del self._streams[stream_id]
            self._spawn(partial(self._drop_log, stream_id))
