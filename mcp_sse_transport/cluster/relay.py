"""Streams relayed between workers: a resume reached a worker that does not own the session, so
the owner streams to it through Redis, one chunk per acknowledgement.

The relaying worker sends :class:`~.messages.Claim` (its place in line, as the resume arrived),
then :class:`~.messages.Attach` (or :class:`~.messages.Detach`, giving the claim back); the owner
sends :class:`~.messages.Chunk` after :class:`~.messages.Chunk`, each once the previous one was
acknowledged (:class:`~.messages.Ack`), and :class:`~.messages.End` closes the stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import uuid4

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import SseConfig
from ..errors import StoreError
from ..handler import Sink
from ..redis_errors import REDIS_FAILURES, redis_errors
from .bus import Bus, OwnerUnreachable
from .messages import Ack, Attach, Chunk, Claim, Detach, End

__all__ = ["Link", "OnAttach", "OnClaim", "Relay", "Relays"]

logger = logging.getLogger("mcp_sse_transport")

OnClaim = Callable[[str, int], tuple[int, int] | None]
"""``(session_id, arrived)``: the owner's claim for a resume that arrived elsewhere, if it has the session."""

OnAttach = Callable[[Attach], Awaitable[None]]
"""Serve a stream another worker relays (in a task of its own)."""

Link = tuple[Sink, Callable[[], Awaitable[object]], tuple[int, int] | None]
"""The owner's end of a relayed stream, as :meth:`Relays.link` yields it."""


class _Link:
    """The owner's end of a stream relayed by another worker."""

    __slots__ = ("acked", "attached", "claim", "detached", "follower", "sent", "woken")

    def __init__(self, follower: str, claim: tuple[int, int] | None) -> None:
        self.follower = follower
        self.claim = claim
        """The session's place in line for this stream, taken as the resume arrived."""
        self.attached = False
        self.sent = 0
        self.acked = 0
        self.woken: anyio.Event | None = None
        self.detached = anyio.Event()

    def ack(self, seq: int) -> None:
        self.acked = max(self.acked, seq)
        if self.woken is not None:
            self.woken.set()


class Relay:
    """The relaying worker's end of a stream whose session lives on another worker:
    :attr:`messages` yields what the owner sends, in order."""

    def __init__(self, relays: Relays, conn: str, owner: str, session_id: str, arrived: int) -> None:
        self._relays = relays
        self.arrived = arrived
        self.conn = conn
        self.owner = owner
        self.session_id = session_id
        self.attached = False
        send, receive = anyio.create_memory_object_stream[Chunk | End](16)
        self._send: MemoryObjectSendStream[Chunk | End] = send
        self.messages: MemoryObjectReceiveStream[Chunk | End] = receive

    async def attach(self, after: str) -> None:
        """Ask the owner to stream the events after ``after`` here (once its claim's turn comes)."""
        await self._relays._attach(self, after)

    def _deliver(self, message: Chunk | End) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:  # the owner sends one chunk per ack: more means it broke protocol
            logger.warning("relay %s: the owner sent more than it may; dropping the relay", self.conn[:8])
            self._send.close()
        except anyio.ClosedResourceError:
            pass


class Relays:
    """This worker's relayed streams, at both ends: those it relays for another worker's session
    (:meth:`relay`), and those of its own sessions another worker relays (:meth:`link`).

    Until :meth:`serve` says how, a claim is kept with no place in line, and an attach ignored.
    """

    def __init__(self, bus: Bus, config: SseConfig) -> None:
        self._bus = bus
        self._config = config
        self._relays: dict[str, Relay] = {}
        self._links: dict[str, _Link] = {}
        self._on_claim: OnClaim | None = None
        self._on_attach: OnAttach | None = None
        bus.on(Claim, self._claimed)
        bus.on(Attach, self._attached)
        bus.on(Chunk, self._relayed)
        bus.on(End, self._relayed)
        bus.on(Ack, self._acked)
        bus.on(Detach, self._detached)

    def serve(self, on_claim: OnClaim, on_attach: OnAttach) -> None:
        """How this worker, as the owner, claims a place for a resume elsewhere, and serves it."""
        self._on_claim, self._on_attach = on_claim, on_attach

    # -- what arrives --------------------------------------------------------------------------

    def _claimed(self, message: Claim) -> None:
        """A resume arrived at another worker: its place in line is now."""
        claim = self._on_claim(message.session_id, message.arrived) if self._on_claim is not None else None
        self._links[message.conn] = claimed = _Link(message.sender, claim)
        self._bus.spawn("expiring a claim", self._expire_unattached, message.conn, claimed)

    def _attached(self, message: Attach) -> None:
        if self._on_attach is not None and (link := self._links.get(message.conn)) is not None:
            link.attached = True
            self._bus.spawn("a stream relayed by another worker", self._on_attach, message)

    def _relayed(self, message: Chunk | End) -> None:
        if (relay := self._relays.get(message.conn)) is not None:
            relay._deliver(message)

    def _acked(self, message: Ack) -> None:
        if (link := self._links.get(message.conn)) is not None:
            link.ack(message.seq)

    def _detached(self, message: Detach) -> None:
        if (link := self._links.get(message.conn)) is not None:
            link.detached.set()
            if not link.attached:
                del self._links[message.conn]

    # -- the relaying worker's end -------------------------------------------------------------

    @asynccontextmanager
    async def relay(self, owner: str, session_id: str, arrived: int) -> AsyncIterator[Relay]:
        """Take the session's place in line at its owner, for a resume that arrived here; then
        :meth:`Relay.attach` asks it to stream the events after a token to this worker.

        Raises :class:`OwnerUnreachable` when nobody listens on the owner's channel.
        """
        relay = Relay(self, uuid4().hex, owner, session_id, arrived)
        self._relays[relay.conn] = relay
        try:
            with redis_errors("relaying a stream", session_id):
                claim = Claim(session_id=session_id, conn=relay.conn, sender=self._bus.worker_id, arrived=arrived)
                received = await self._bus.publish(owner, claim)
            if not received:
                raise OwnerUnreachable(owner)
            try:
                yield relay
            finally:
                if not relay.attached:  # the owner holds the claim: give it back
                    with anyio.CancelScope(shield=True):
                        await self.detach(relay)
        finally:
            del self._relays[relay.conn]
            relay._send.close()

    async def _attach(self, relay: Relay, after: str) -> None:
        relay.attached = True
        attach = Attach(
            session_id=relay.session_id, conn=relay.conn, sender=self._bus.worker_id, after=after, arrived=relay.arrived
        )
        with redis_errors("relaying a stream", relay.session_id):
            received = await self._bus.publish(relay.owner, attach)
        if not received:
            raise OwnerUnreachable(relay.owner)

    async def ack(self, relay: Relay, seq: int) -> None:
        """Tell the owner chunk ``seq`` was written: it may send the next."""
        try:
            received = await self._bus.publish(relay.owner, Ack(conn=relay.conn, seq=seq))
        except REDIS_FAILURES as exc:
            raise StoreError(f"could not acknowledge a relayed chunk: {exc}") from exc
        if not received:  # the owner would wait for it forever: end the stream, the client resumes
            raise StoreError("could not acknowledge a relayed chunk: the owner no longer listens")

    async def detach(self, relay: Relay) -> None:
        """Tell the owner the relayed connection is gone."""
        try:
            await self._bus.publish(relay.owner, Detach(conn=relay.conn))
        except REDIS_FAILURES as exc:
            logger.info("cluster: could not report a closed relay (%s)", exc)

    # -- the owner's end -----------------------------------------------------------------------

    @asynccontextmanager
    async def link(self, attach: Attach) -> AsyncIterator[Link]:
        """The owner's end of a relayed stream: a sink that returns once the relaying worker
        wrote the chunk, an awaitable that returns once its connection is gone, and the claim
        taken when the resume arrived (``None`` if the session was not here yet)."""
        conn, follower = attach.conn, attach.sender
        link = self._links.setdefault(conn, _Link(follower, None))

        async def sink(chunk: bytes) -> None:
            link.sent += 1
            seq = link.sent
            if not await self._bus.publish(follower, Chunk(conn=conn, seq=seq, body=chunk)):
                raise OwnerUnreachable(follower)  # the relaying worker is gone
            while link.acked < seq:
                link.woken = anyio.Event()
                await link.woken.wait()

        try:
            yield sink, link.detached.wait, link.claim
        finally:
            self._links.pop(conn, None)

    async def end_link(self, attach: Attach, graceful: bool) -> None:
        """Tell the relaying worker the stream is over (``graceful``: close it, else drop it)."""
        self._links.pop(attach.conn, None)
        try:
            await self._bus.publish(attach.sender, End(conn=attach.conn, graceful=graceful))
        except REDIS_FAILURES as exc:
            logger.info("cluster: could not end a relayed stream (%s)", exc)

    async def _expire_unattached(self, conn: str, link: _Link) -> None:
        """Drop a claim whose stream never attached once its relaying worker is gone (it died
        while replaying, before its ``attach`` or ``detach``): checked every ``owner_lease``, so
        a claim outlives its worker by at most that, plus one ``PUBSUB NUMSUB``."""
        while self._links.get(conn) is link and not link.attached:
            with anyio.move_on_after(self._config.owner_lease):
                await link.detached.wait()
            if self._links.get(conn) is not link or link.attached or link.detached.is_set():
                return
            try:
                listening = await self._bus.listening(link.follower)
            except REDIS_FAILURES:
                continue  # Redis is away: the follower may well be alive; ask again later
            if not listening:
                if self._links.get(conn) is link and not link.attached:
                    del self._links[conn]
                return
