"""This library's event store behind the SDK's ``EventStore`` ABC, one per session, for users
who keep the SDK's own ``StreamableHTTPSessionManager``.

The stock manager hands one event store to every session's transport, and the SDK's stream ids
(``_GET_stream``, each request's id) are unique only within a transport: with a store shared that
way, a ``Last-Event-ID`` of one session can replay another session's events. A
:class:`SessionScopedEventStore` serves one session: every SDK stream of it logs under a random
key of our store, and its event ids are ``<key>.<secret>:<token>`` (:mod:`~mcp_sse_transport.ids`),
so an id replays only the events of its own stream in its own session, and only for whoever saw
the secret on the stream. :func:`scoped_stock_manager` gives the stock manager one per session::

    store = InMemoryEventStore()  # or a RedisEventStore
    manager = scoped_stock_manager(server, store, retry_interval=1000)
    app = Starlette(
        routes=[Route("/mcp", StreamableHTTPASGIApp(manager))],
        lifespan=lambda app: manager.run(),
    )
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from ._sdk import (
    MCPServer,
    Message,
    PerSessionStoreManager,
    SdkEventMessage,
    SdkEventStore,
    Server,
    StockSessionManager,
    lowlevel_server,
    parse,
    sdk_message,
    serialize,
)
from .errors import StoreError
from .ids import format_event_id, new_secret, parse_event_id, secret_matches, session_tag
from .store import EventStore

__all__ = ["SessionScopedEventStore", "scoped_stock_manager"]

logger = logging.getLogger("mcp_sse_transport")

_PRIMING = b""
"""What a priming event (the SDK's ``message`` of ``None``) is stored as: no message is empty."""


@dataclass(frozen=True, slots=True)
class _Stream:
    stream_id: str
    """The SDK's stream id: ``_GET_stream``, or a request's id as ``str``."""
    key: str
    """What our store logs the stream under: 32 random hex digits."""
    secret: str


class SessionScopedEventStore(SdkEventStore):
    """The SDK ``EventStore`` of one session, over this library's ``store`` (shared by all).

    Each SDK stream of the session logs under a key of its own, made at its first event; a
    ``Last-Event-ID`` replays the events after it of its stream, and nothing for an id that is
    malformed, forged (a wrong secret), of another session or stream store, or trimmed away
    entirely (``None``: the SDK answers with an empty stream). Where the store trimmed some of
    the events after the id, the rest are replayed (the SDK has no way to tell the client of a
    gap, which is logged). Priming events are stored, so their ids resume, and never replayed.

    ``session_id`` names the session in logs (default: a random name). ``max_streams`` bounds the
    streams remembered: past it, the one used least recently is forgotten, its events dropped
    from the store. :meth:`aclose` drops them all, once the session is over.
    """

    def __init__(
        self,
        store: EventStore,
        session_id: str | None = None,
        *,
        max_streams: int = 1024,
        replay_batch: int = 256,
    ) -> None:
        if max_streams < 1 or replay_batch < 1:
            raise ValueError("max_streams and replay_batch must be positive")
        self.store = store
        self.session_id = session_id if session_id is not None else uuid4().hex
        self.max_streams = max_streams
        self.replay_batch = replay_batch
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        """By SDK stream id, the least recently used first."""
        self._keys: dict[str, _Stream] = {}
        self._closed = False

    @property
    def streams(self) -> int:
        """How many streams it remembers. (Not ``__len__``: the SDK's transport tests its store
        for truth, and an adapter with no stream yet must not read as no store.)"""
        return len(self._streams)

    @property
    def closed(self) -> bool:
        return self._closed

    async def store_event(self, stream_id: str, message: Message | None) -> str:
        if self._closed:  # the session is over: an id that resumes nothing
            return format_event_id(uuid4().hex, "0", new_secret())
        data = _PRIMING if message is None else serialize(message)
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(stream_id, uuid4().hex, new_secret())
            self._keys[stream.key] = stream
            while len(self._streams) > self.max_streams:
                _, oldest = self._streams.popitem(last=False)
                del self._keys[oldest.key]
                await self._drop(oldest)
        else:
            self._streams.move_to_end(stream_id)
        token = await self.store.append(stream.key, None, data)
        return format_event_id(stream.key, token, stream.secret)

    async def replay_events_after(
        self, last_event_id: str, send_callback: Callable[[SdkEventMessage], Awaitable[None]]
    ) -> str | None:
        """Send the stream's events after ``last_event_id`` to ``send_callback``, oldest first,
        read from the store ``replay_batch`` at a time until a read finds nothing more (events
        stored while the last ones were sent are sent too; the SDK's transport still has a window
        of its own between a replay and the live stream); the stream's SDK id, or ``None`` when
        the id resumes nothing of this session."""
        parsed = parse_event_id(last_event_id)
        stream = self._keys.get(parsed.session_id) if parsed is not None else None
        if parsed is None or stream is None or not secret_matches(parsed.secret, stream.secret):
            logger.info("session %s: refused a Last-Event-ID of no stream of its own", self._tag)
            return None
        self._streams.move_to_end(stream.stream_id)
        after = parsed.token
        first = True
        while True:
            replay = await self.store.replay(stream.key, after, limit=self.replay_batch)
            if replay is None:  # trimmed away entirely, dropped, or a token never issued
                if first:
                    logger.info("session %s: nothing to resume after a Last-Event-ID", self._tag)
                    return None
                return stream.stream_id
            if replay.gap:
                logger.warning("session %s: resumed past events the store had trimmed", self._tag)
            for event in replay.events:
                if event.data != _PRIMING:
                    event_id = format_event_id(stream.key, event.token, stream.secret)
                    await send_callback(SdkEventMessage(sdk_message(parse(event.data)), event_id))
            if not replay.events:  # read again after the last sends: what was stored meanwhile
                return stream.stream_id
            after = replay.events[-1].token
            first = False

    async def aclose(self) -> None:
        """Forget every stream, and drop their events from the store; later events are not
        stored. Idempotent; a store's failure to drop is logged (its limits trim them)."""
        self._closed = True
        streams = list(self._streams.values())
        self._streams.clear()
        self._keys.clear()
        for stream in streams:
            await self._drop(stream)

    async def _drop(self, stream: _Stream) -> None:
        try:
            await self.store.drop(stream.key)
        except StoreError as exc:
            logger.warning("session %s: could not drop a stream's events (%s)", self._tag, exc)

    @property
    def _tag(self) -> str:
        return session_tag(self.session_id)


async def _release(event_store: SdkEventStore) -> None:
    if isinstance(event_store, SessionScopedEventStore):
        await event_store.aclose()


def scoped_stock_manager(
    app: MCPServer[Any] | Server[Any],
    store: EventStore,
    *,
    max_streams: int = 1024,
    **stock_kwargs: Any,
) -> StockSessionManager:
    """The SDK's own ``StreamableHTTPSessionManager`` for ``app``, each session's transport with a
    :class:`SessionScopedEventStore` of its own over ``store``, closed (its events dropped) when
    the session ends. ``stock_kwargs`` are the stock constructor's (``json_response``,
    ``retry_interval``, ``security_settings``, ``session_idle_timeout``, ...), but no
    ``event_store`` and not ``stateless``. Run it and mount it as the stock manager."""

    def event_store_for(session_id: str) -> SdkEventStore:
        return SessionScopedEventStore(store, session_id, max_streams=max_streams)

    return PerSessionStoreManager(lowlevel_server(app), event_store_for, _release, **stock_kwargs)
