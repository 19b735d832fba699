"""Scale-out on Redis: the session directory, messages between workers, and leases.

A *worker* is one process's transport. A session belongs to the worker holding its lease (a
Redis key renewed every third of ``owner_lease``); the directory also keeps the owning
credential's fingerprint, the session's handshake and the requests accepted but not answered.
Each worker subscribes to a channel of its own; another worker reaches a session's owner
there, to hand it a POST or to relay a resumed stream, and knows the owner is gone when no one
is subscribed. The transport decides what to do with these; this module only moves them.

Leases are fenced (:mod:`~mcp_sse_transport.fencing`): each has a generation Redis issued, and
what an owner writes for a session (appends, answers struck off, renewals, release, forget) is
refused in Redis once another worker took a lease of it since.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast
from uuid import uuid4

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .config import SseConfig
from .errors import FencedError, StoreError
from .fencing import ABANDON, ACQUIRE, FORGET, REGISTER, RELEASE, REMOVE_PENDING, RENEW, Lease
from .handler import Sink, session_tag
from .ids import SEEN_REQUEST_IDS
from .redis_store import RedisEventStore

__all__ = ["Cluster", "DirectoryEntry", "OwnerUnreachable", "Relay"]

logger = logging.getLogger("mcp_sse_transport")

_ACCEPT = """
local current = redis.call('hget', KEYS[1], ARGV[1])
if current == ARGV[2] then return 1 end
if current then
  local reclaimable = false
  for i = 6, #ARGV do if current == ARGV[i] then reclaimable = true end end
  if not reclaimable then return 0 end
elseif redis.call('scard', KEYS[2]) >= tonumber(ARGV[5]) then
  return -1
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('pexpire', KEYS[2], ARGV[4])
if not current and redis.call('hlen', KEYS[1]) > tonumber(ARGV[3]) then
  for _, field in ipairs(redis.call('hrandfield', KEYS[1], 2)) do
    if field ~= ARGV[1] then redis.call('hdel', KEYS[1], field) break end
  end
end
return 1
"""
"""Note a request id as seen and unanswered, stamped with the accepting attempt's nonce: 1 if
accepted now (or already by this very attempt: a retry after a lost reply is harmless), 0 if
seen before, -1 if the session has too many requests unanswered. An id stamped with one of the
``reclaim`` nonces (attempts of this worker that recorded the id but never delivered it) is
taken over by this attempt. KEYS: seen (a hash: id -> nonce), pending; ARGV: the id, the
nonce, how many ids to remember, the keys' expiry in ms, the pending bound, reclaimable nonces."""

_UNACCEPT = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('srem', KEYS[2], ARGV[1])
return 1
"""
"""Undo an attempt's record of a request it did not deliver, unless another attempt took the id
over meanwhile: idempotent, and harmless however late it runs. KEYS: seen, pending; ARGV: the
id, the nonce."""

Accepted = Literal["new", "seen", "full"]
"""What :meth:`Cluster.accept_request` found."""


_DROP_STALE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
"""Delete the owner key if it names this worker (ARGV[1]): one this worker holds no lease for."""

RESUBSCRIBE_WINDOW = 1.0
"""Seconds a message nobody received is sent again for: a worker subscribing again after a fault
of its channel's connection is back well within it (one round trip, or redis-py's reconnect)."""


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
    """The relaying worker's end of a stream whose session lives on another worker: what the
    owner sends, in order, as ``(header, body)`` pairs."""

    def __init__(self, cluster: Cluster, conn: str, owner: str, session_id: str, arrived: int) -> None:
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
        self._leases: dict[str, Lease] = {}
        """The fenced leases of the sessions in ``_held``: their generations, and until when
        each is surely valid. The store fences its appends by them."""
        store.leases = self._leases
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._register = redis.register_script(REGISTER)
        self._acquire = redis.register_script(ACQUIRE)
        self._forget = redis.register_script(FORGET)
        self._remove_pending = redis.register_script(REMOVE_PENDING)
        self._abandon = redis.register_script(ABANDON)
        self._accept = redis.register_script(_ACCEPT)
        self._unaccept = redis.register_script(_UNACCEPT)
        self._once = store.redis
        """The store's client, which never sends a command twice: for what must not run twice
        (``PUBLISH``: a chunk or a POST relayed twice). ``redis`` retries idempotent commands."""
        self._task_group: anyio.abc.TaskGroup | None = None
        self.on_post: Callable[[dict[str, Any], bytes], Awaitable[int]] | None = None
        self.on_claim: Callable[[str, int], tuple[int, int] | None] | None = None
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
        """Dispatch this worker's messages; subscribe again whenever Redis drops us (a redis-py
        PubSub does not recover from a server restart: a new one is made). The first time at
        once, on a connection of its own: a fault of the subscription's connection alone (killed,
        reset) stays its own, and the other connections' commands in flight go on. Only if
        Redis itself could not be reached, with backoff, and once it is back, if it restarted
        (its ``run_id`` changed), the idle pooled connections are dropped (each would fail one
        command); connections in use are never dropped here.
        What other workers send meanwhile is not lost: nobody receives it, so they send again
        (:meth:`_publish`)."""
        failures = 0
        await self._restarted()  # which Redis this is, to tell a restart from a fault of ours
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                        await pubsub.subscribe(self._channel)
                        if failures > 1 and await self._restarted():
                            await self.redis.connection_pool.disconnect(inuse_connections=False)
                            if self._once is not self.redis:  # never retried: its stale connections would fail
                                await self._once.connection_pool.disconnect(inuse_connections=False)
                        failures = 0
                        logger.info("cluster: this worker's channel is back")
                    message = await pubsub.get_message(timeout=1.0)
                except (RedisError, OSError) as exc:
                    failures += 1
                    (logger.warning if failures == 1 else logger.debug)(
                        "cluster: lost this worker's channel (%s); subscribing again", exc
                    )
                    if pubsub is not None:
                        with anyio.CancelScope(shield=True), suppress(RedisError, OSError):
                            await pubsub.aclose()
                        pubsub = None
                    if failures > 1:  # Redis itself is unreachable: back off
                        await anyio.sleep(min(0.1 * 2 ** min(failures - 2, 8), self.config.owner_lease / 3))
                    continue
                if message is not None and message.get("type") == "message":
                    self._dispatch(*_unpack(message["data"]))
        finally:
            if pubsub is not None:
                with anyio.CancelScope(shield=True), suppress(RedisError, OSError):
                    await pubsub.aclose()

    _redis_run_id: str | None = None
    """The ``run_id`` of the Redis this worker last saw, to tell when it restarted."""

    async def _restarted(self) -> bool:
        """Whether Redis restarted since this worker last asked (its ``run_id`` changed), or
        cannot say: then the pooled connections from before it are dead."""
        try:
            info = await self.redis.info("server")
        except (RedisError, OSError):
            return True
        previous, self._redis_run_id = self._redis_run_id, str(info.get("run_id"))
        return previous != self._redis_run_id

    def _dispatch(self, header: dict[str, Any], body: bytes) -> None:
        kind = header.get("t")
        if kind == "post" and self.on_post is not None:
            self.spawn("a POST handed over by another worker", self._answer_post, header, body)
        elif kind == "posted" and (reply := self._replies.get(header["r"])) is not None:
            reply[1].append(int(header["s"]))
            reply[0].set()
        elif kind == "claim":  # a resume arrived at another worker: its place in line is now
            claim = self.on_claim(header["sid"], header["at"]) if self.on_claim is not None else None
            self._links[header["c"]] = claimed = _Link(header["f"], claim)
            self.spawn("expiring a claim", self._expire_unattached, header["c"], claimed)
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
        """Send to a worker; returns how many received it (0: nobody listens there).

        Nobody receiving it may mean the worker is subscribing again after a fault of its
        channel's connection: it is sent again, with backoff, for up to
        :data:`RESUBSCRIBE_WINDOW` (or a third of ``owner_lease``), before 0 is returned. A
        message nobody received is never lost silently: the sender learns of it (and one
        received is never sent again)."""
        data = _pack(header, body)
        channel = self._worker_channel(worker_id)
        window = min(RESUBSCRIBE_WINDOW, self.config.owner_lease / 3)
        delay, waited = 0.005, 0.0
        while not (received := int(await self._once.publish(channel, data))) and waited < window:
            await anyio.sleep(delay)  # nothing to wait on: the receiver's subscription is in Redis
            waited += delay
            delay = min(delay * 2, max(window - waited, 0.005))
        return received

    async def _renew_leases(self) -> None:
        interval = self.config.owner_lease / 3
        lease_ms = round(self.config.owner_lease * 1000)
        keep_ms = round(self.config.replay_max_age * 1000)
        while True:
            await anyio.sleep(interval)
            owned = [(session_id, lease) for session_id in self._owned if (lease := self._leases.get(session_id))]
            if not owned:
                continue
            sent = time.monotonic()  # before the renewal goes out: each lease is valid until this + owner_lease
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for session_id, lease in owned:
                        keys = [self._key(session_id, name) for name in ("owner", "meta", "pending", "seen")]
                        await self._renew(
                            [*keys, self.store.key(session_id)],
                            [self.worker_id, lease_ms, keep_ms, lease.generation],
                            pipe,
                        )
                    results = await pipe.execute()
            except (RedisError, OSError) as exc:
                logger.warning("cluster: could not renew %d lease(s): %s", len(owned), exc)
                continue
            for (session_id, lease), renewed in zip(owned, results, strict=True):
                if renewed == 1:
                    lease.renewed(sent)
                elif self._leases.get(session_id) is lease:
                    self._lose(session_id, gone=renewed == -1)
                else:  # an older lease of a session taken over anew here meanwhile
                    lease.revoke()

    def _lose(self, session_id: str, gone: bool = False) -> None:
        """This worker's lease of the session is lost: another worker holds it (its renewal or
        another fenced command was refused), or (``gone``) Redis lost the session. Nothing more
        is written for it here; the transport hands the session off, or ends it."""
        lease = self._leases.get(session_id)
        if lease is not None:
            lease.revoke()  # calls back here: the session is no longer in _owned then
        if session_id in self._owned:
            self._owned.discard(session_id)
            logger.warning(
                "session %s: %s",
                session_tag(session_id),
                "Redis no longer knows it" if gone else "another worker holds its lease now",
            )
            if self.on_lost is not None:
                self.on_lost(session_id, gone)

    def _revoked(self, lease: Lease) -> None:
        if self._leases.get(lease.session_id) is lease:  # not an older lease of a session taken over anew
            self._lose(lease.session_id)

    def lease(self, session_id: str) -> Lease | None:
        """This worker's current lease of the session, if it holds one."""
        return self._leases.get(session_id)

    def _take_lease(self, session_id: str, generation: int, sent: float) -> None:
        self._leases[session_id] = Lease(
            session_id,
            generation,
            worker_id=self.worker_id,
            owner_key=self._key(session_id, "owner"),
            meta_key=self._key(session_id, "meta"),
            term=self.config.owner_lease,
            sent=sent,
            timeout=self.config.forward_timeout,
            on_revoked=self._revoked,
        )
        self._owned.add(session_id)
        self._held.add(session_id)

    def _fence(self, session_id: str) -> tuple[list[str], list[str | int]]:
        """The owner and meta keys, the worker id and the generation a fenced script checks.
        Raises :class:`FencedError` when this worker holds no lease of the session."""
        lease = self._leases.get(session_id)
        if lease is None or lease.revoked:
            raise FencedError(f"session {session_tag(session_id)}: this worker holds no lease of it")
        return lease.fence()

    def serves(self, session_id: str) -> bool:
        """Whether this worker holds the session's lease, as far as it knows (one revoked, or
        given up, it does not)."""
        lease = self._leases.get(session_id)
        return lease is not None and not lease.revoked

    # -- the directory -------------------------------------------------------------------------

    async def register(self, session_id: str, fingerprint: str, secret: str) -> None:
        """Enter a new session with this worker as its owner."""
        keep_ms = round(self.config.replay_max_age * 1000)
        lease_ms = round(self.config.owner_lease * 1000)
        keys = [self._key(session_id, "owner"), self._key(session_id, "meta")]
        sent = time.monotonic()
        async with _redis_errors("registering", session_id):
            generation = int(await self._register(keys, [self.worker_id, lease_ms, keep_ms, fingerprint, secret]))
        self._take_lease(session_id, generation, sent)

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
        """Take the lease of a session whose owner's ran out, with a new generation: every
        fenced command of the previous owner fails from now on. False if another worker was
        first, or the session is gone."""
        keys = [self._key(session_id, "owner"), self._key(session_id, "meta")]
        sent = time.monotonic()
        async with _redis_errors("taking over", session_id):
            generation = int(await self._acquire(keys, [self.worker_id, round(self.config.owner_lease * 1000)]))
        if generation <= 0:
            return False
        self._take_lease(session_id, generation, sent)
        return True

    def renews(self, session_id: str) -> bool:
        """Whether this worker holds a lease of the session: it serves it, or is ending it."""
        return session_id in self._owned or session_id in self._leases

    async def drop_stale_lease(self, session_id: str) -> None:
        """Delete the ``owner`` key if it names this worker while this worker holds no lease of
        the session (a lease left behind: its release failed), so the session can be taken
        over, with a new generation, at once. Call it only when :meth:`renews` is False."""
        async with _redis_errors("dropping a stale lease", session_id):
            await self.redis.register_script(_DROP_STALE)([self._key(session_id, "owner")], [self.worker_id])

    async def lease_remaining(self, session_id: str) -> float:
        """Seconds until the current owner's lease runs out (0: it has)."""
        async with _redis_errors("reading the lease", session_id):
            remaining = await self.redis.pttl(self._key(session_id, "owner"))
        return max(0, int(remaining)) / 1000

    async def release(self, session_id: str, lease: Lease | None = None) -> None:
        """Give up this worker's lease (``lease``, default the current one), so another can
        take the session over at once (fenced: a lease another worker holds now is left alone,
        and so is a newer lease of this worker's)."""
        current = self._leases.get(session_id)
        lease = lease or current
        if lease is current:
            self._owned.discard(session_id)
        if lease is not None:
            lease.revoke()  # nothing more is written for it here
            async with _redis_errors("releasing", session_id):
                await self._release(*lease.fence())
        if lease is current:
            self._held.discard(session_id)
            self._leases.pop(session_id, None)

    async def abandon(self, session_id: str) -> None:
        """Give up a lease taken over by a takeover that failed: if nothing was written under
        it, as if it had never been taken (the previous owner may take it back); else as
        :meth:`release` does."""
        lease = self._leases.get(session_id)
        if lease is None or lease.wrote:
            return await self.release(session_id)
        self._owned.discard(session_id)
        lease.revoke()
        async with _redis_errors("releasing", session_id):
            await self._abandon(*lease.fence())
        self._held.discard(session_id)
        self._leases.pop(session_id, None)

    async def _release_all(self) -> None:
        """Give up every lease this worker may still hold, leaving: one that a session's own
        release missed (Redis was busy, or the worker cut short) would otherwise be waited out."""
        held = list(self._held)
        if not held:
            return
        self._owned.difference_update(held)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in held:
                    if (lease := self._leases.get(session_id)) is not None:
                        lease.revoke()
                        await self._release(*lease.fence(), pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("cluster: could not give up %d lease(s) on leaving: %s", len(held), exc)
        else:
            self._held.clear()
            self._leases.clear()

    async def forget(self, session_id: str, lease: Lease | None = None) -> None:
        """Remove an ended session from the directory, its events included: one script, fenced
        by ``lease`` (default: the current one). Raises :class:`FencedError`, deleting nothing,
        when another lease of the session was taken since (the session lives on there)."""
        current = self._leases.get(session_id)
        lease = lease or current
        if lease is None:
            raise FencedError(f"session {session_tag(session_id)}: not forgotten, this worker holds no lease of it")
        if lease is not current:  # taken over anew, here: the newer lease is left alone
            await self.release(session_id, lease)
            raise FencedError(f"session {session_tag(session_id)}: not forgotten, it was taken over since")
        self._owned.discard(session_id)
        lease.revoke()
        keys, args = lease.fence()
        keys += [self._key(session_id, name) for name in ("pending", "seen", "claims")]
        async with _redis_errors("forgetting", session_id):
            forgotten = await self._forget([*keys, self.store.key(session_id)], args)
        self._held.discard(session_id)
        self._leases.pop(session_id, None)
        if not forgotten:
            raise FencedError(f"session {session_tag(session_id)}: not forgotten, another worker holds it now")

    async def record_handshake(self, session_id: str, field: str, body: bytes) -> None:
        async with _redis_errors("recording the handshake", session_id):
            await self.redis.hset(self._key(session_id, "meta"), field, body)

    async def accept_request(
        self, session_id: str, request_id: str | int, nonce: str, reclaim: Collection[str] = ()
    ) -> Accepted:
        """Note a request as accepted and unanswered, by the attempt ``nonce``: ``"new"``;
        ``"seen"`` if the session had it already (a POST the client sent again, not knowing
        whether the first one arrived), unless it was recorded by one of the ``reclaim``
        attempts (recorded, never delivered); ``"full"`` past :attr:`max_pending` unanswered
        requests (nothing recorded). Safe to send again: the same nonce is accepted once."""
        keys = [self._key(session_id, "seen"), self._key(session_id, "pending")]
        args: list[str | int] = [json.dumps(request_id), nonce, SEEN_REQUEST_IDS]
        args += [round(self.config.replay_max_age * 1000), self.max_pending, *reclaim]
        async with _redis_errors("recording a request", session_id):
            outcome = int(await self._accept(keys, args))
        return "new" if outcome == 1 else "seen" if outcome == 0 else "full"

    @property
    def max_pending(self) -> int:
        """Requests a session may have accepted and not answered (``replay_max_events``): a
        worker taking it over answers each with ``REQUEST_INTERRUPTED``, and the replay log must
        keep those answers."""
        return self.config.replay_max_events

    async def unaccept_request(self, session_id: str, request_id: str | int, nonce: str) -> bool:
        """Undo the record of the attempt ``nonce``, which did not deliver the request (unless
        another attempt took the id over since); False if nothing was undone."""
        keys = [self._key(session_id, "seen"), self._key(session_id, "pending")]
        async with _redis_errors("undoing a request's record", session_id):
            return bool(await self._unaccept(keys, [json.dumps(request_id), nonce]))

    async def remove_pending(self, session_id: str, *request_ids: str | int) -> None:
        """The requests were answered (their answers are stored). Fenced: raises
        :class:`FencedError`, striking nothing off, once another worker holds the session."""
        fence_keys, fence_args = self._fence(session_id)
        lease = self._leases[session_id]
        lease.wrote = True
        async with _redis_errors("recording a response", session_id):
            removed = await self._remove_pending(
                [self._key(session_id, "pending"), *fence_keys],
                [*fence_args, *(json.dumps(rid) for rid in request_ids)],
            )
        if int(removed) < 0:
            lease.revoke()  # lost: the cluster is told (if it is still the current lease)
            raise FencedError(f"session {session_tag(session_id)}: answers not recorded, another worker holds it now")

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
    async def relay(self, owner: str, session_id: str, arrived: int) -> AsyncIterator[Relay]:
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
            received = await self._publish(relay.owner, header)
        if not received:
            raise OwnerUnreachable(relay.owner)

    async def ack(self, relay: Relay, seq: int) -> None:
        """Tell the owner chunk ``seq`` was written: it may send the next."""
        try:
            received = await self._publish(relay.owner, {"t": "ack", "c": relay.conn, "s": seq})
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not acknowledge a relayed chunk: {exc}") from exc
        if not received:  # the owner would wait for it forever: end the stream, the client resumes
            raise StoreError("could not acknowledge a relayed chunk: the owner no longer listens")

    async def detach(self, relay: Relay) -> None:
        """Tell the owner the relayed connection is gone."""
        try:
            await self._publish(relay.owner, {"t": "detach", "c": relay.conn})
        except (RedisError, OSError) as exc:
            logger.info("cluster: could not report a closed relay (%s)", exc)

    @asynccontextmanager
    async def link(
        self, header: dict[str, Any]
    ) -> AsyncIterator[tuple[Sink, Callable[[], Awaitable[object]], tuple[int, int] | None]]:
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

    async def _expire_unattached(self, conn: str, link: _Link) -> None:
        """Drop a claim whose stream never attached once its relaying worker is gone (it died
        while replaying, before its ``attach`` or ``detach``): checked every ``owner_lease``, so
        a claim outlives its worker by at most that, plus one ``PUBSUB NUMSUB``."""
        while self._links.get(conn) is link and not link.attached:
            with anyio.move_on_after(self.config.owner_lease):
                await link.detached.wait()
            if self._links.get(conn) is not link or link.attached or link.detached.is_set():
                return
            try:
                listening = await self.redis.pubsub_numsub(self._worker_channel(link.follower))
            except (RedisError, OSError):
                continue  # Redis is away: the follower may well be alive; ask again later
            if not listening or not int(listening[0][1]):
                if self._links.get(conn) is link and not link.attached:
                    del self._links[conn]
                return

    async def end_link(self, header: dict[str, Any], graceful: bool) -> None:
        """Tell the relaying worker the stream is over (``graceful``: close it, else drop it)."""
        self._links.pop(header["c"], None)
        try:
            await self._publish(header["f"], {"t": "end", "c": header["c"], "g": graceful})
        except (RedisError, OSError) as exc:
            logger.info("cluster: could not end a relayed stream (%s)", exc)
