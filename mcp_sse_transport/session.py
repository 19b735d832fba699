"""A session as the session host holds it: its stream, its server's inbound end, its owner."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio

from ._sdk import Inbound, SessionMessage, types
from .handler import SessionHandler
from .ids import SEEN_REQUEST_IDS

if TYPE_CHECKING:
    from .fencing import Lease

__all__ = [
    "ACCEPTED",
    "NOT_FOUND",
    "NOT_HERE",
    "REPEATED",
    "STORE_UNAVAILABLE",
    "Attempts",
    "Delivery",
    "OneStream",
    "Outcome",
    "Restore",
    "Routing",
    "SeenIds",
    "Session",
    "SessionsFull",
    "Stream",
]


class Stream(Protocol):
    """Where a session's outbound messages go: a :class:`SessionHandler`, or a front end's
    stand-in (a JSON response body, a stream that ended)."""

    @property
    def tag(self) -> str: ...

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None: ...

    async def flush(self) -> None: ...


class Routing(Protocol):
    """Which of a session's streams an outbound message goes to: a front end's policy."""

    def stream_for(self, item: SessionMessage) -> Stream: ...

    def answered(self, request_id: types.RequestId, stream: Stream) -> None:
        """``stream`` took the answer to ``request_id``."""
        ...


class OneStream:
    """The legacy HTTP+SSE transport's routing: a session has one stream, and every message
    goes there."""

    __slots__ = ("stream",)

    def __init__(self, stream: SessionHandler) -> None:
        self.stream = stream

    def stream_for(self, item: SessionMessage) -> Stream:
        return self.stream

    def answered(self, request_id: types.RequestId, stream: Stream) -> None:
        pass  # the one stream goes on


@dataclass(slots=True)
class Session:
    """One session: an SDK server run fed through ``inbound``, its owner, and its streams (the
    first, ``handler``, carries what no other stream is for)."""

    handler: SessionHandler
    inbound: Inbound
    owner: str
    """The fingerprint of the credential that opened the session."""
    routing: Routing = field(init=False)
    """Where the server's messages go: :class:`OneStream` unless a front end sets another policy."""
    swallow: types.RequestId | None = None
    """Taken over or restored: the id of the replayed ``initialize``, whose response the client
    already has (or never asked for)."""
    handed_off: bool = False
    """Another worker carries the session on: its shared state outlives this process's copy."""
    seen: SeenIds | None = None
    """Request ids already accepted, from the first request on (in memory: Redis keeps them
    across workers)."""
    exchanged: bool = False
    """A message went either way: a POST reached the session, or its server sent one. Until then
    the session is a probe, with nothing to resume: it ends with its connection instead of
    waiting ``session_grace``."""
    restore: Restore | None = None
    """A handshake to replay before the first message, unless that message is ``initialize``."""
    lease: Lease | None = None
    """With Redis: this worker's lease of the session, which fences what it writes for it."""
    attempts: Attempts = field(default_factory=lambda: Attempts())
    """With Redis: the POSTs of a request id being delivered, and those that recorded it in
    Redis without delivering it."""

    def __post_init__(self) -> None:
        self.routing = OneStream(self.handler)

    @property
    def session_id(self) -> str:
        return self.handler.session_id


class Restore:
    """The handshake of a client that reconnected initialized (it sent ``MCP-Protocol-Version``)
    but could not resume: replayed to the new session's server before the client's first message,
    so its calls work without an ``initialize`` of its own."""

    __slots__ = ("lock", "version")

    def __init__(self, version: str) -> None:
        self.version = version
        self.lock = anyio.Lock()
        """Held while the handshake is replayed: concurrent first POSTs queue behind it."""


class SeenIds:
    """The last :data:`SEEN_REQUEST_IDS` request ids of a session, to recognise a POST sent again."""

    __slots__ = ("_ids", "_order")

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def add(self, request_id: types.RequestId) -> bool:
        """False if the id was seen before."""
        key = json.dumps(request_id)
        if key in self._ids:
            return False
        self._ids.add(key)
        self._order.append(key)
        if len(self._order) > SEEN_REQUEST_IDS:
            self._ids.discard(self._order.popleft())
        return True

    def discard(self, request_id: types.RequestId) -> None:
        """Forget an id accepted but never delivered: sent again, it is delivered then."""
        key = json.dumps(request_id)
        if key in self._ids:
            self._ids.discard(key)
            self._order.remove(key)


class Attempts:
    """One session's delivery attempts of requests, on the worker serving it (the only one that
    delivers them): one attempt per request id at a time, each stamped in Redis with a nonce of
    its own. An attempt that may have recorded its id (the reply was lost, say) and did not
    deliver the request leaves its nonce here: the next attempt of that id takes the record
    over, instead of taking the id for one already delivered."""

    __slots__ = ("in_flight", "undelivered")

    def __init__(self) -> None:
        self.in_flight: dict[str, anyio.Event] = {}
        self.undelivered: dict[str, set[str]] = {}
        """Request id (as JSON) -> nonces of attempts that may have recorded it, undelivered."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a POSTed message, for the front end to answer: an HTTP status and its text
    (``json``: the text is a JSON body), and what to do once the answer was sent."""

    status: int
    text: str
    json: bool = False
    retry: bool = False
    """Answer with ``Retry-After``: the client may send it again later."""
    report: Callable[[], Awaitable[None]] | None = None
    """Put the refusal on the event stream too (stock clients drop a POST's answer)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a front end adds to a message it hands to the server (Streamable HTTP's hooks)."""

    on_unanswered: Callable[[], Awaitable[None]] | None = None
    """Runs if the request settles without an answer (it was cancelled)."""
    close_stream: Callable[[], Awaitable[None]] | None = None
    """Behind ``ctx.close_sse_stream()``: end the request's stream for the client to poll."""
    close_standalone: Callable[[], Awaitable[None]] | None = None
    can_send_request: bool = True
    """Whether the request's channel can carry the server's own requests (not a JSON body)."""
    once: bool = True
    """Deliver a request id the session accepted before only once (legacy SSE: a POST sent
    again); False delivers it anew (Streamable HTTP clients reuse ids, as the SDK's tests do)."""


ACCEPTED = Outcome(202, "Accepted")
REPEATED = Outcome(202, "Accepted")
"""A request id the session accepted before (MCP forbids reuse: a POST sent again), not
delivered twice: the legacy front end answers it as :data:`ACCEPTED`."""
NOT_FOUND = Outcome(404, "Could not find session")
NOT_HERE = Outcome(421, "Could not find session")
"""What a worker answers a message for a session it no longer serves (HTTP's Misdirected
Request): not delivered, so the sender looks for the session again."""
STORE_UNAVAILABLE = Outcome(503, "Session store unavailable", retry=True)


class SessionsFull(Exception):
    """This worker has ``max_sessions`` open: it cannot open or take over another session."""
