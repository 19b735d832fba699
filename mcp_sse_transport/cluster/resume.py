"""Resumes of another worker's session: the stored events replayed here, then the owner's live
events relayed (:mod:`.relay`); or, when the owner is gone, the session taken over here. And the
owner's side: a stream of its session that another worker relays."""

from __future__ import annotations

import logging
from functools import partial

import anyio
from starlette.types import Receive, Scope, Send

from .._asgi import REFUSED, disconnected, end_stream, open_stream, stream_session, write_within
from .._sdk import owner_fingerprint
from ..backplane import Host, Resume
from ..config import SseConfig
from ..errors import ErrorCode, StoreError
from ..events import encode_error
from ..handler import Sink
from ..ids import EventId, event_id_prefix, secret_matches, session_tag
from ..replay import replay_chunks
from ..session import Session, SessionsFull
from .bus import OwnerUnreachable
from .directory import Directory, DirectoryEntry
from .messages import Attach, End
from .relay import Relay, Relays
from .takeover import Takeovers

__all__ = ["Resumes"]

logger = logging.getLogger("mcp_sse_transport")


class Resumes:
    """Resumes of sessions this worker does not hold, and relayed streams of those it does."""

    def __init__(
        self, directory: Directory, relays: Relays, takeovers: Takeovers, host: Host, config: SseConfig
    ) -> None:
        self._directory = directory
        self._relays = relays
        self._takeovers = takeovers
        self._host = host
        self._config = config
        self.store = directory.store
        relays.serve(self._on_claim, self._on_attach)

    async def resume_elsewhere(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send, preface: bytes
    ) -> Resume | None:
        """What serves the resume of a session this worker does not hold, if Redis knows it, the
        id carries its secret, and it belongs to this credential."""
        session_id, token, secret = parsed
        entry = await self._directory.lookup(session_id)
        if entry is None or not secret_matches(secret, entry.secret) or entry.fingerprint != owner_fingerprint(scope):
            return None
        if await self.store.replay(session_id, token, until=token) is None:
            return None
        logger.info("session %s: resuming another worker's session", session_tag(session_id))
        return partial(self._resume, session_id, token, entry, arrived, scope, receive, send, preface)

    async def _resume(
        self,
        session_id: str,
        token: str,
        entry: DirectoryEntry,
        arrived: int,
        scope: Scope,
        receive: Receive,
        send: Send,
        preface: bytes,
    ) -> None:
        """Serve a resume here: replay from Redis, then relay the owner's live events; or, if the
        owner is gone, take the session over and serve it as this worker's own."""
        directory, takeovers, config = self._directory, self._takeovers, self._config
        sink = await open_stream(send, scope, config.socket_send_buffer)
        after: str | None = token
        session: Session | None = None
        try:
            for _ in range(3):  # the owner may die, and another worker take over, meanwhile
                if entry.owner is not None and entry.owner != directory.worker_id:
                    try:
                        async with self._relays.relay(entry.owner, session_id, arrived) as relay:
                            if preface:
                                after = await self._replay_here(sink, session_id, entry.secret, token, preface)
                                preface = b""
                            if after is None:
                                break
                            await relay.attach(after)
                            graceful = await self._follow(relay, sink, receive, session_id)
                        return await end_stream(scope, send, graceful, config.write_timeout)
                    except OwnerUnreachable:
                        with anyio.fail_after(config.owner_lease + config.forward_timeout):
                            await takeovers.await_lease(session_id)
                session = await takeovers.adopt(session_id)
                if session is not None:
                    break
                if entry.owner == directory.worker_id:
                    await takeovers.clear_own_lease(session_id)
                next_entry = await directory.lookup(session_id)
                if next_entry is None:
                    break
                entry = next_entry
        except (StoreError, TimeoutError) as exc:
            logger.warning("session %s: resume failed (%s)", session_tag(session_id), exc)
            session = None
        except SessionsFull:  # the client reconnects after the retry hint, to this worker or another
            full = encode_error(ErrorCode.SERVER_SHUTDOWN, "Too many open sessions", retry=config.retry_ms)
            await write_within(sink, full, config.write_timeout)
            return await end_stream(scope, send, False, config.write_timeout)
        if session is None or after is None:
            return await end_stream(scope, send, False, config.write_timeout)
        await stream_session(session.handler, scope, receive, send, preface, after=after, sink=sink, arrived=arrived)

    async def _replay_here(self, sink: Sink, session_id: str, secret: str, token: str, preface: bytes) -> str | None:
        """Write ``preface`` and the stored events after ``token``; returns the last token
        written, or ``None`` if the connection failed."""
        within = self._config.write_timeout
        if not await write_within(sink, preface, within):
            return None
        last = token
        async for chunk, _, through in replay_chunks(
            self.store, session_id, event_id_prefix(session_id, secret), token
        ):
            if not await write_within(sink, chunk, within):
                return None
            last = through
        return last

    async def _follow(self, relay: Relay, sink: Sink, receive: Receive, session_id: str) -> bool:
        """Write what the owner relays until it ends the stream (returns whether gracefully), the
        client goes, a write stalls, or the owner's lease passes to another worker."""
        relays, directory = self._relays, self._directory
        graceful = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await disconnected(receive)()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                while True:
                    with anyio.move_on_after(self._config.owner_lease) as idle:
                        message = await relay.messages.receive()
                    if idle.cancelled_caught:
                        entry = await directory.lookup(session_id)
                        if entry is None or entry.owner != relay.owner:
                            break
                        continue
                    if isinstance(message, End):
                        graceful = message.graceful
                        break
                    if not await write_within(sink, message.body, self._config.write_timeout):
                        logger.info("session %s: a relayed write failed or stalled", session_tag(session_id))
                        break
                    await relays.ack(relay, message.seq)
            except Exception as exc:  # the client, Redis or the relay failed: the stream is over
                logger.info("session %s: relayed stream ended (%s)", session_tag(session_id), type(exc).__name__)
            tg.cancel_scope.cancel()
        if not graceful:
            await relays.detach(relay)
        return graceful

    def _on_claim(self, session_id: str, arrived: int) -> tuple[int, int] | None:
        """A resume of this worker's session arrived at another worker: its place in line."""
        session = self._host.sessions.get(session_id)
        return session.handler.claim(arrived) if session is not None else None

    async def _on_attach(self, attach: Attach) -> None:
        """Another worker relays a resumed stream of this worker's session: serve it through Redis."""
        session = await self._takeovers.local(attach.session_id)
        graceful = False
        try:
            if session is None or session.handler.ended:
                return
            handler = session.handler
            async with self._relays.link(attach) as (sink, closed, claim):
                if claim is None:  # the session was being taken over here when the resume arrived
                    claim = handler.claim(attach.arrived)
                attachment = await handler.attach_latest(claim)
                if attachment is not None:
                    graceful = await handler.run(sink, after=attach.after, attachment=attachment, closed=closed)
                else:  # a later resume won: this one is told so, through the relay, then ends
                    graceful = await write_within(sink, REFUSED, self._config.write_timeout)
        finally:
            await self._relays.end_link(attach, graceful)
