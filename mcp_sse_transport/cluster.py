"""Scale-out on Redis: the session directory, messages between workers, and leases.

A *worker* is one process's transport. A session belongs to the worker holding its lease (a
Redis key renewed every third of ``owner_lease``); the directory also keeps the owning
credential's fingerprint, the session's handshake and the requests accepted but not answered.
Each worker subscribes to a channel of its own; another worker reaches a session's owner
there, to hand it a POST or to relay a resumed stream, and knows the owner is gone when no one
is subscribed. The transport decides what to do with these; this module only moves them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast
from uuid import uuid4

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .config import SseConfig
from .errors import StoreError
from .handler import Sink, session_tag
from .ids import SEEN_REQUEST_IDS
from .redis_store import RedisEventStore

__all__ = ["Cluster", "DirectoryEntry", "OwnerUnreachable", "Relay"]

logger = logging.getLogger("mcp_sse_transport")

_RENEW = """
local owner = redis.call('get', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
if redis.call('exists', KEYS[2]) == 0 then return -1 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do redis.call('pexpire', KEYS[i], ARGV[3]) end
return 1
"""
"""Renew this worker's lease (or take it back if it ran out while no one took it: after a Redis
outage), and keep the session's other keys from expiring. 0: another worker holds it; -1: the
session's directory entry is gone (Redis lost its data)."""

_ACCEPT = """
if redis.call('sadd', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[3])
redis.call('pexpire', KEYS[2], ARGV[3])
if redis.call('scard', KEYS[1]) > tonumber(ARGV[2]) then redis.call('spop', KEYS[1]) end
return 1
"""
"""Note a request id as seen and unanswered, unless it was seen before: 0 then. KEYS: seen,
pending; ARGV: the id, how many ids to remember, the keys' expiry in ms."""

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class OwnerUnreachable(Exception):
    """No worker listens on the session owner's channel: it died, or lost Redis."""


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """What Redis knows of a session."""

    owner: str | None
    """The worker holding the lease, ``None`` once it ran out."""
    fingerprint: str
    """Of the credential that opened the session (empty when anonymous)."""
    secret: str
    """The session's resume secret, which every event id carries."""
    handshake: tuple[bytes, ...]
    """The ``initialize`` request and the ``initialized`` notification as POSTed, those seen so far."""


@asynccontextmanager
async def _redis_errors(operation: str, session_id: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"{operation} for session {session_tag(session_id)} failed: {exc}") from exc


def _pack(header: dict[str, Any], body: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def _unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    header, _, body = data.partition(b"\n")
    return cast(dict[str, Any], json.loads(header)), body


class _Link:
    """The owner's end of a stream relayed by another worker."""

    __slots__ = ("acked", "attached", "claim", "detached", "follower", "sent", "woken")

    def __init__(self, follower: str, claim: tuple[float, int] | None) -> None:
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
    """The relaying worker's end of a stream whose session lives on another worker: what the
    owner sends, in order, as ``(header, body)`` pairs."""

    def __init__(self, cluster: Cluster, conn: str, owner: str, session_id: str, arrived: float) -> None:
        self._cluster = cluster
        self.arrived = arrived
        self.conn = conn
        self.owner = owner
        self.session_id = session_id
        self.attached = False
        send, self.messages = anyio.create_memory_object_stream[tuple[dict[str, Any], bytes]](16)
        self._send: MemoryObjectSendStream[tuple[dict[str, Any], bytes]] = send

    async def attach(self, after: str) -> None:
        """Ask the owner to stream the events after ``after`` here (once its claim's turn comes)."""
        await self._cluster._attach(self, after)

    def _deliver(self, header: dict[str, Any], body: bytes) -> None:
        try:
            self._send.send_nowait((header, body))
        except anyio.WouldBlock:  # the owner sends one chunk per ack: more means it broke protocol
            logger.warning("relay %s: the owner sent more than it may; dropping the relay", self.conn[:8])
            self._send.close()
        except anyio.ClosedResourceError:
            pass


class Cluster:
    """One worker's membership of the cluster: directory operations, leases, messages.

    ``on_post(header, body)`` and ``on_attach(header)`` are called, each in a task of its own,
    for POSTs handed over by other workers and for streams they relay; ``on_lost(session_id,
    gone)`` when another worker holds a session's lease now, or (``gone``) Redis lost the session.
    """

    def __init__(self, redis: Redis, store: RedisEventStore, config: SseConfig) -> None:
        self.redis = redis
        self.store = store
        self.config = config
        self.worker_id = uuid4().hex[:16]
        self._prefix = config.redis_prefix
        self._channel = self._worker_channel(self.worker_id)
        self._owned: set[str] = set()
        """Sessions whose leases this worker renews: the ones it serves."""
        self._held: set[str] = set()
        """Sessions whose leases this worker may still hold in Redis: given up on leaving."""
        self._replies: dict[str, tuple[anyio.Event, list[int]]] = {}
        self._relays: dict[str, Relay] = {}
        self._links: dict[str, _Link] = {}
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._accept = redis.register_script(_ACCEPT)
        self._task_group: anyio.abc.TaskGroup | None = None
        self.on_post: Callable[[dict[str, Any], bytes], Awaitable[int]] | None = None
        self.on_claim: Callable[[str, float], tuple[float, int] | None] | None = None
        self.on_attach: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.on_lost: Callable[[str, bool], None] | None = None

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, session_id: str, name: str) -> str:
        return f"{self._prefix}{{{session_id}}}:{name}"

    def _worker_channel(self, worker_id: str) -> bytes:
        return f"{self._prefix}worker:{worker_id}".encode()

    def check_running(self) -> None:
        """Raise RuntimeError unless the transport was entered (``async with``): a worker that
        is not subscribed to its channel would never get what other workers send it."""
        if self._task_group is None:
            raise RuntimeError("the cluster is not running: enter the transport with `async with` first")

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """Where work that outlives a request runs (sessions taken over, relayed streams)."""
        self.check_running()
        assert self._task_group is not None
        return self._task_group

    def spawn(self, what: str, function: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``function(*args)`` in the worker's task group; a failure is logged, never allowed
        to end the worker (it would take every other session with it)."""

        async def guarded() -> None:
            try:
                await function(*args)
            except Exception:
                logger.exception("cluster: %s failed", what)

        self.task_group.start_soon(guarded)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        pubsub: Any = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)  # before any lease is taken: nothing sent to us is lost
        except (RedisError, OSError) as exc:
            await pubsub.aclose()
            raise StoreError(f"could not subscribe to this worker's channel: {exc}") from exc
        self._task_group = await anyio.create_task_group().__aenter__()
        self._task_group.start_soon(self._listen, pubsub)
        self._task_group.start_soon(self._renew_leases)
        logger.info("cluster worker %s joined", self.worker_id)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> bool | None:
        task_group, self._task_group = self.task_group, None
        task_group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.forward_timeout):
            await self._release_all()
        return await task_group.__aexit__(exc_type, exc_val, exc_tb)

    async def _listen(self, pubsub: Any) -> None:
        """Dispatch this worker's messages; subscribe again, with backoff, whenever Redis drops
        us (a redis-py PubSub does not recover from a server restart: a new one is made)."""
        delay = 0.1
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                        await pubsub.subscribe(self._channel)
                        logger.info("cluster: this worker's channel is back")
                    message = await pubsub.get_message(timeout=1.0)
                    delay = 0.1
                except (RedisError, OSError) as exc:
                    (logger.warning if delay == 0.1 else logger.debug)(
                        "cluster: lost this worker's channel (%s); subscribing again", exc
                    )
                    if pubsub is not None:
                        with anyio.CancelScope(shield=True), suppress(RedisError, OSError):
                            await pubsub.aclose()
                            # Every pooled connection is as dead: drop them, or each would fail
                            # one command (a pipeline is not retried) once Redis is back.
                            await self.redis.connection_pool.disconnect()
                        pubsub = None
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.config.owner_lease / 3)
                    continue
                if message is not None and message.get("type") == "message":
                    self._dispatch(*_unpack(message["data"]))
        finally:
            if pubsub is not None:
                with anyio.CancelScope(shield=True), suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _dispatch(self, header: dict[str, Any], body: bytes) -> None:
        kind = header.get("t")
        if kind == "post" and self.on_post is not None:
            self.spawn("a POST handed over by another worker", self._answer_post, header, body)
        elif kind == "posted" and (reply := self._replies.get(header["r"])) is not None:
            reply[1].append(int(header["s"]))
            reply[0].set()
        elif kind == "claim":  # a resume arrived at another worker: its place in line is now
            claim = self.on_claim(header["sid"], header["at"]) if self.on_claim is not None else None
            self._links[header["c"]] = _Link(header["f"], claim)
        elif kind == "attach" and self.on_attach is not None and (link := self._links.get(header["c"])) is not None:
            link.attached = True
            self.spawn("a stream relayed by another worker", self.on_attach, header)
        elif kind in ("chunk", "end") and (relay := self._relays.get(header["c"])) is not None:
            relay._deliver(header, body)
        elif kind == "ack" and (link := self._links.get(header["c"])) is not None:
            link.ack(int(header["s"]))
        elif kind == "detach" and (link := self._links.get(header["c"])) is not None:
            link.detached.set()
            if not link.attached:
                del self._links[header["c"]]

    async def _publish(self, worker_id: str, header: dict[str, Any], body: bytes = b"") -> int:
        """Send to a worker; returns how many received it (0: nobody listens there)."""
        return int(await self.redis.publish(self._worker_channel(worker_id), _pack(header, body)))

    async def _renew_leases(self) -> None:
        interval = self.config.owner_lease / 3
        lease_ms = round(self.config.owner_lease * 1000)
        keep_ms = round(self.config.replay_max_age * 1000)
        while True:
            await anyio.sleep(interval)
            owned = list(self._owned)
            if not owned:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for session_id in owned:
                        keys = [self._key(session_id, name) for name in ("owner", "meta", "pending", "seen")]
                        await self._renew(
                            [*keys, self.store.key(session_id)], [self.worker_id, lease_ms, keep_ms], pipe
                        )
                    results = await pipe.execute()
            except (RedisError, OSError) as exc:
                logger.warning("cluster: could not renew %d lease(s): %s", len(owned), exc)
                continue
            for session_id, renewed in zip(owned, results, strict=True):
                if renewed != 1 and session_id in self._owned:
                    self._owned.discard(session_id)
                    gone = renewed == -1
                    logger.warning(
                        "session %s: %s",
                        session_tag(session_id),
                        "Redis no longer knows it" if gone else "another worker holds its lease now",
                    )
                    if self.on_lost is not None:
                        self.on_lost(session_id, gone)

    # -- the directory -------------------------------------------------------------------------

    async def register(self, session_id: str, fingerprint: str, secret: str) -> None:
        """Enter a new session with this worker as its owner."""
        keep_ms = round(self.config.replay_max_age * 1000)
        async with _redis_errors("registering", session_id):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(session_id, "owner"), self.worker_id, px=round(self.config.owner_lease * 1000))
                pipe.hset(self._key(session_id, "meta"), mapping={"fp": fingerprint, "rs": secret})
                pipe.pexpire(self._key(session_id, "meta"), keep_ms)
                await pipe.execute()
        self._owned.add(session_id)
        self._held.add(session_id)

    async def lookup(self, session_id: str) -> DirectoryEntry | None:
        async with _redis_errors("looking up", session_id):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._key(session_id, "meta"))
                pipe.get(self._key(session_id, "owner"))
                meta, owner = await pipe.execute()
        if not meta:
            return None
        handshake = tuple(meta[field] for field in (b"init", b"initialized") if field in meta)
        if b"rs" not in meta:  # entered by an older version, whose event ids carry no secret
            return None
        return DirectoryEntry(owner.decode() if owner else None, meta[b"fp"].decode(), meta[b"rs"].decode(), handshake)

    async def acquire(self, session_id: str) -> bool:
        """Take the lease of a session whose owner's ran out; False if another worker was first."""
        async with _redis_errors("taking over", session_id):
            taken = await self.redis.set(
                self._key(session_id, "owner"), self.worker_id, px=round(self.config.owner_lease * 1000), nx=True
            )
        if taken:
            self._owned.add(session_id)
            self._held.add(session_id)
        return bool(taken)

    async def lease_remaining(self, session_id: str) -> float:
        """Seconds until the current owner's lease runs out (0: it has)."""
        async with _redis_errors("reading the lease", session_id):
            remaining = await self.redis.pttl(self._key(session_id, "owner"))
        return max(0, int(remaining)) / 1000

    async def release(self, session_id: str) -> None:
        """Give up this worker's lease, so another can take the session over at once."""
        self._owned.discard(session_id)
        async with _redis_errors("releasing", session_id):
            await self._release([self._key(session_id, "owner")], [self.worker_id])
        self._held.discard(session_id)

    async def _release_all(self) -> None:
        """Give up every lease this worker may still hold, leaving: one that a session's own
        release missed (Redis was busy, or the worker cut short) would otherwise be waited out."""
        held = list(self._held)
        if not held:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in held:
                    await self._release([self._key(session_id, "owner")], [self.worker_id], pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("cluster: could not give up %d lease(s) on leaving: %s", len(held), exc)
        else:
            self._held.clear()

    async def forget(self, session_id: str) -> None:
        """Remove an ended session from the directory, its events included."""
        self._owned.discard(session_id)
        async with _redis_errors("forgetting", session_id):
            await self._release([self._key(session_id, "owner")], [self.worker_id])
            names = ("meta", "pending", "seen")
            await self.redis.delete(*(self._key(session_id, name) for name in names))
        self._held.discard(session_id)
        await self.store.drop(session_id)

    async def record_handshake(self, session_id: str, field: str, body: bytes) -> None:
        async with _redis_errors("recording the handshake", session_id):
            await self.redis.hset(self._key(session_id, "meta"), field, body)

    async def accept_request(self, session_id: str, request_id: str | int) -> bool:
        """Note a request as accepted and unanswered; False if the session had it already (a
        POST the client sent again, not knowing whether the first one arrived)."""
        keys = [self._key(session_id, "seen"), self._key(session_id, "pending")]
        async with _redis_errors("recording a request", session_id):
            new = await self._accept(
                keys, [json.dumps(request_id), SEEN_REQUEST_IDS, round(self.config.replay_max_age * 1000)]
            )
        return bool(new)

    async def remove_pending(self, session_id: str, *request_ids: str | int) -> None:
        """The requests were answered (their answers are stored)."""
        async with _redis_errors("recording a response", session_id):
            await self.redis.srem(self._key(session_id, "pending"), *(json.dumps(rid) for rid in request_ids))

    async def pending(self, session_id: str) -> list[str | int]:
        """The requests accepted and not answered."""
        async with _redis_errors("reading unanswered requests", session_id):
            members = await self.redis.smembers(self._key(session_id, "pending"))
        return sorted((cast(str | int, json.loads(member)) for member in members), key=str)

    # -- POSTs for another worker's session ----------------------------------------------------

    async def forward(self, owner: str, header: dict[str, Any], body: bytes) -> int:
        """Hand a POST to the session's owner; returns the HTTP status it answered with.

        Raises :class:`OwnerUnreachable` when nobody listens on the owner's channel,
        TimeoutError when it did not answer within ``forward_timeout``, StoreError.
        """
        reply_id = uuid4().hex
        done = anyio.Event()
        status: list[int] = []
        self._replies[reply_id] = (done, status)
        try:
            async with _redis_errors("handing over a POST", header["sid"]):
                received = await self._publish(owner, {**header, "t": "post", "r": reply_id, "f": self.worker_id}, body)
            if not received:
                raise OwnerUnreachable(owner)
            with anyio.fail_after(self.config.forward_timeout):
                await done.wait()
            return status[0]
        finally:
            del self._replies[reply_id]

    async def _answer_post(self, header: dict[str, Any], body: bytes) -> None:
        assert self.on_post is not None
        status = 500  # unless the owner answers: the sender must not wait out its timeout
        try:
            status = await self.on_post(header, body)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reply(header, status)

    async def _reply(self, header: dict[str, Any], status: int) -> None:
        try:
            await self._publish(header["f"], {"t": "posted", "r": header["r"], "s": status})
        except (RedisError, OSError) as exc:
            logger.warning("cluster: could not answer a handed-over POST (%s)", exc)

    # -- streams relayed by another worker -----------------------------------------------------

    @asynccontextmanager
    async def relay(self, owner: str, session_id: str, arrived: float) -> AsyncIterator[Relay]:
        """Take the session's place in line at its owner, for a resume that arrived here; then
        :meth:`Relay.attach` asks it to stream the events after a token to this worker.

        Raises :class:`OwnerUnreachable` when nobody listens on the owner's channel.
        """
        relay = Relay(self, uuid4().hex, owner, session_id, arrived)
        self._relays[relay.conn] = relay
        try:
            async with _redis_errors("relaying a stream", session_id):
                claim = {"t": "claim", "sid": session_id, "c": relay.conn, "f": self.worker_id, "at": arrived}
                received = await self._publish(owner, claim)
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
        header: dict[str, Any] = {"t": "attach", "sid": relay.session_id, "c": relay.conn, "f": self.worker_id}
        header.update(a=after, at=relay.arrived)
        async with _redis_errors("relaying a stream", relay.session_id):
            await self._publish(relay.owner, header)

    async def ack(self, relay: Relay, seq: int) -> None:
        """Tell the owner chunk ``seq`` was written: it may send the next."""
        try:
            await self._publish(relay.owner, {"t": "ack", "c": relay.conn, "s": seq})
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not acknowledge a relayed chunk: {exc}") from exc

    async def detach(self, relay: Relay) -> None:
        """Tell the owner the relayed connection is gone."""
        try:
            await self._publish(relay.owner, {"t": "detach", "c": relay.conn})
        except (RedisError, OSError) as exc:
            logger.info("cluster: could not report a closed relay (%s)", exc)

    @asynccontextmanager
    async def link(
        self, header: dict[str, Any]
    ) -> AsyncIterator[tuple[Sink, Callable[[], Awaitable[object]], tuple[float, int] | None]]:
        """The owner's end of a relayed stream: a sink that returns once the relaying worker
        wrote the chunk, an awaitable that returns once its connection is gone, and the claim
        taken when the resume arrived (``None`` if the session was not here yet)."""
        conn, follower = header["c"], header["f"]
        link = self._links.setdefault(conn, _Link(follower, None))

        async def sink(chunk: bytes) -> None:
            link.sent += 1
            seq = link.sent
            if not await self._publish(follower, {"t": "chunk", "c": conn, "s": seq}, chunk):
                raise OwnerUnreachable(follower)  # the relaying worker is gone
            while link.acked < seq:
                link.woken = anyio.Event()
                await link.woken.wait()

        try:
            yield sink, link.detached.wait, link.claim
        finally:
            self._links.pop(conn, None)

    async def end_link(self, header: dict[str, Any], graceful: bool) -> None:
        """Tell the relaying worker the stream is over (``graceful``: close it, else drop it)."""
        self._links.pop(header["c"], None)
        try:
            await self._publish(header["f"], {"t": "end", "c": header["c"], "g": graceful})
        except (RedisError, OSError) as exc:
            logger.info("cluster: could not end a relayed stream (%s)", exc)
