"""The backplane on Redis: sessions shared by every worker, POSTs handed to a session's owner,
resumes relayed from it, and sessions whose owner is gone taken over."""

from __future__ import annotations

import logging
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ._asgi import REFUSED, disconnected, end_stream, open_stream, stream_session, write_within
from ._sdk import Server, auth_context, forwarded_user, owner_fingerprint, user_token
from .backplane import Host, Resume
from .claims import ClaimSequence, RedisClaimSequence
from .config import SseConfig
from .errors import ErrorCode, StoreError
from .events import encode_error
from .handler import Sink, replay_chunks
from .ids import EventId, event_id_prefix, secret_matches, session_tag
from .ledger import RequestLedger
from .redis_ledger import RedisRequestLedger
from .session import NOT_FOUND, NOT_HERE, STORE_UNAVAILABLE, Outcome, Session, SessionsFull
from .store import EventStore
from .takeover import Takeovers

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .cluster import Cluster, DirectoryEntry, Relay

__all__ = ["RedisBackplane"]

logger = logging.getLogger("mcp_sse_transport")


class _Done(Exception):
    """The outcome of a POST is decided."""


_STATUS_TEXT = {202: "Accepted", 400: "Could not parse message", 404: "Could not find session"}


class RedisBackplane:
    """Sessions in Redis: any worker sharing it serves any request (``server`` runs the sessions
    this worker takes over)."""

    def __init__(self, config: SseConfig, event_store: EventStore | None, server: Server[Any]) -> None:
        self._config = config
        self._server = server
        self._cluster = _cluster(config, event_store)
        self._store_client: Redis | None = self._cluster.store.redis if event_store is None else None
        """The store's client, when it is ours: closed on leaving."""
        self.store: EventStore = self._cluster.store
        self.ledger: RequestLedger = RedisRequestLedger(self._cluster)
        self.claims: ClaimSequence = RedisClaimSequence(self._cluster.redis, config.redis_prefix, config.replay_max_age)
        self._host: Host | None = None
        self._takeovers: Takeovers | None = None

    def bind(self, host: Host) -> None:
        self._host = host
        self._takeovers = Takeovers(host, self._cluster, self._server)

    @property
    def _bound(self) -> tuple[Host, Takeovers]:
        assert self._host is not None and self._takeovers is not None, "bind() first"
        return self._host, self._takeovers

    async def __aenter__(self) -> RedisBackplane:
        cluster = self._cluster
        cluster.on_post = self._on_post
        cluster.on_claim = self._on_claim
        cluster.on_attach = self._on_attach
        cluster.on_lost = self._on_lost
        await cluster.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self._cluster.__aexit__(exc_type, exc_val, exc_tb)
        await self._cluster.redis.aclose()
        if self._store_client is not None:
            await self._store_client.aclose()

    def check_running(self) -> None:
        self._cluster.check_running()

    async def register(self, session: Session) -> None:
        await self._cluster.register(session.session_id, session.owner, session.handler.secret)
        self._bound[1].fence(session)

    def serves(self, session_id: str) -> bool:
        return self._cluster.serves(session_id)

    async def forget(self, session: Session) -> None:
        if session.handed_off:
            await self._cluster.release(session.session_id, session.lease)
        else:
            await self._cluster.forget(session.session_id, session.lease)

    async def hand_off(self, session_id: str) -> None:
        await self._cluster.release(session_id)

    # -- POSTs for sessions another worker owns, or owned ----------------------------------------

    async def post_elsewhere(self, session_id: str, request: Request) -> Outcome:
        """Hand the POST to the session's owner, or take the session over if the owner is gone;
        503 if neither happens within ``forward_timeout`` (not delivered), 504 if the owner may
        have taken it but did not say so in time."""
        from .cluster import OwnerUnreachable

        cluster, (host, takeovers) = self._cluster, self._bound
        outcome = Outcome(503, "Session owner unreachable", retry=True)
        handed_over = False
        """A handover is under way: the owner may have the message, whatever happens now."""
        try:
            with anyio.move_on_after(self._config.forward_timeout):
                entry = await cluster.lookup(session_id)
                if entry is None or entry.fingerprint != owner_fingerprint(request.scope):
                    logger.info("POST for unknown session %s", session_tag(session_id))
                    outcome = NOT_FOUND
                    raise _Done
                body = await request.body()
                while True:
                    if entry.owner is not None and entry.owner != cluster.worker_id:
                        handed_over = True
                        try:
                            status = await cluster.forward(entry.owner, _forwarded(request.scope, session_id), body)
                        except OwnerUnreachable:  # nobody received it: not delivered
                            handed_over = False
                            await takeovers.await_lease(session_id)
                        else:
                            handed_over = False
                            if status != NOT_HERE.status:
                                outcome = _status_outcome(status)
                                raise _Done
                            await takeovers.await_lease(session_id)  # not delivered: it serves the session no more
                    session = await takeovers.adopt(session_id)
                    if session is not None:
                        outcome = await host.deliver(session, body, request)
                        if outcome.status != NOT_HERE.status:
                            raise _Done
                        outcome = Outcome(503, "Session owner unreachable", retry=True)  # unless a next turn finds it
                    if entry.owner == cluster.worker_id:  # so the next turn takes it, or waits
                        await takeovers.clear_own_lease(session_id)
                    entry = await cluster.lookup(session_id)
                    if entry is None:
                        outcome = NOT_FOUND
                        raise _Done
        except _Done:
            pass
        except SessionsFull:
            outcome = Outcome(503, "Too many open sessions", retry=True)
        except TimeoutError:
            logger.warning("session %s: its owner did not take a POST in time", session_tag(session_id))
        except StoreError as exc:
            logger.warning("%s", exc)
            outcome = STORE_UNAVAILABLE
        if handed_over:
            # It may have been delivered. Safe to send again: a request id is delivered once per session.
            logger.warning("session %s: a POST handed to its owner has an unknown outcome", session_tag(session_id))
            outcome = Outcome(504, "Outcome unknown: the session's owner may have taken the message", retry=True)
        return outcome

    async def _on_post(self, header: dict[str, Any], body: bytes) -> int:
        """A POST another worker handed over for a session of this worker's."""
        host, takeovers = self._bound
        session = await takeovers.local(header["sid"])
        if session is None:  # it moved on (taken over, or handed off) since the sender looked
            return NOT_HERE.status
        request = _forwarded_request(header)
        with auth_context(request.scope):
            outcome = await host.deliver(session, body, request)
        if outcome.report is not None:
            self._cluster.spawn("reporting a parse error", outcome.report)
        return outcome.status

    def _on_claim(self, session_id: str, arrived: int) -> tuple[int, int] | None:
        """A resume of this worker's session arrived at another worker: its place in line."""
        session = self._bound[0].sessions.get(session_id)
        return session.handler.claim(arrived) if session is not None else None

    def _on_lost(self, session_id: str, gone: bool) -> None:
        """This worker no longer holds the session: another worker took it over (end the stream
        here, so the client resumes where the session lives now), or Redis lost it (end it)."""
        session = self._bound[0].sessions.get(session_id)
        if session is None:
            return
        if gone:
            message = "Session state was lost from Redis; the session ends"
            end = session.handler.send_error
            self._cluster.spawn("ending a lost session", end, ErrorCode.STORE_UNAVAILABLE, message)
        else:
            # Ended at once, with no drain: whatever it still has was stored before the lease was
            # lost (the new owner replays it) or never will be. The client's resume finds it there.
            session.handed_off = True
            session.handler.abort("another worker serves the session now")

    # -- resumes of sessions another worker owns, or owned ---------------------------------------

    async def resume_elsewhere(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send, preface: bytes
    ) -> Resume | None:
        """What serves the resume of a session this worker does not hold, if Redis knows it, the
        id carries its secret, and it belongs to this credential."""
        session_id, token, secret = parsed
        entry = await self._cluster.lookup(session_id)
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
        from .cluster import OwnerUnreachable

        cluster, (_, takeovers), config = self._cluster, self._bound, self._config
        sink = await open_stream(send, scope, config.socket_send_buffer)
        after: str | None = token
        session: Session | None = None
        try:
            for _ in range(3):  # the owner may die, and another worker take over, meanwhile
                if entry.owner is not None and entry.owner != cluster.worker_id:
                    try:
                        async with cluster.relay(entry.owner, session_id, arrived) as relay:
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
                if entry.owner == cluster.worker_id:
                    await takeovers.clear_own_lease(session_id)
                next_entry = await cluster.lookup(session_id)
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
        cluster = self._cluster
        graceful = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await disconnected(receive)()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                while True:
                    with anyio.move_on_after(self._config.owner_lease) as idle:
                        header, body = await relay.messages.receive()
                    if idle.cancelled_caught:
                        entry = await cluster.lookup(session_id)
                        if entry is None or entry.owner != relay.owner:
                            break
                        continue
                    if header["t"] == "end":
                        graceful = bool(header["g"])
                        break
                    with anyio.fail_after(self._config.write_timeout):
                        await sink(body)
                    await cluster.ack(relay, header["s"])
            except Exception as exc:  # the client, Redis or the relay failed: the stream is over
                logger.info("session %s: relayed stream ended (%s)", session_tag(session_id), type(exc).__name__)
            tg.cancel_scope.cancel()
        if not graceful:
            await cluster.detach(relay)
        return graceful

    async def _on_attach(self, header: dict[str, Any]) -> None:
        """Another worker relays a resumed stream of this worker's session: serve it through Redis."""
        session = await self._bound[1].local(header["sid"])
        graceful = False
        try:
            if session is None or session.handler.ended:
                return
            handler = session.handler
            async with self._cluster.link(header) as (sink, closed, claim):
                if claim is None:  # the session was being taken over here when the resume arrived
                    claim = handler.claim(header["at"])
                attachment = await handler.attach_latest(claim)
                if attachment is not None:
                    graceful = await handler.run(sink, after=header["a"], attachment=attachment, closed=closed)
                else:  # a later resume won: this one is told so, through the relay, then ends
                    graceful = await write_within(sink, REFUSED, self._config.write_timeout)
        finally:
            await self._cluster.end_link(header, graceful)


def _status_outcome(status: int) -> Outcome:
    """The outcome of a POST the owner answered with ``status``."""
    if status == 503:
        return STORE_UNAVAILABLE
    return Outcome(status, _STATUS_TEXT.get(status, "Internal Server Error"))


def _forwarded(scope: Scope, session_id: str) -> dict[str, Any]:
    """What the owner needs of a POST to rebuild its request: path, query, headers, user."""
    return {
        "sid": session_id,
        "p": scope.get("path", ""),
        "q": scope.get("query_string", b"").decode("latin-1"),
        "h": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope.get("headers", [])],
        "u": user_token(scope),
    }


def _forwarded_request(header: dict[str, Any]) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": header["p"],
        "root_path": "",
        "query_string": header["q"].encode("latin-1"),
        "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in header["h"]],
    }
    if header["u"] is not None:
        scope["user"] = forwarded_user(header["u"])
    return Request(scope)


def _cluster(config: SseConfig, event_store: EventStore | None) -> Cluster:
    """The Redis side of a transport with ``redis_url``: client, store, directory."""
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff, NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError as exc:
        raise ImportError("redis_url needs the redis extra: pip install 'mcp-sse-transport[redis]'") from exc
    from .cluster import Cluster
    from .redis_store import RedisEventStore

    url = config.redis_url
    assert url is not None

    def client(retry: Retry) -> Redis:
        return Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=config.forward_timeout,
            retry=retry,
            health_check_interval=30,
        )

    # Tried once more after a dropped connection (a lost reply, say): only what may run twice
    # goes through it (reads, SET, SREM, PEXPIRE, scripts made idempotent). A timeout is not
    # tried again: every command keeps its deadline.
    redis = client(Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(RedisConnectionError,)))
    if event_store is None:
        # Never tried again by the client: an append (XADD) or a PUBLISH sent twice would run twice.
        event_store = RedisEventStore(
            client(Retry(NoBackoff(), 0)),
            prefix=config.redis_prefix,
            max_events=config.replay_max_events,
            max_age=config.replay_max_age,
        )
    elif not isinstance(event_store, RedisEventStore):
        raise ValueError("with redis_url, event_store must be a RedisEventStore (or None)")
    return Cluster(redis, event_store, config)
