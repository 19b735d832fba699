"""The session directory in Redis, and this worker's leases of its sessions.

A session belongs to the worker holding its lease (the ``owner`` key, renewed every third of
``owner_lease``); its ``meta`` hash keeps the owning credential's fingerprint, the resume
secret, the handshake and the lease's generation. Leases are fenced
(:mod:`~mcp_sse_transport.fencing`): what an owner writes for a session (appends, answers
struck off, renewals, release, forget) is refused in Redis once another worker took a lease of
it since; this worker then learns the lease is lost (:attr:`Directory.on_lost`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
from redis.asyncio import Redis

from ..config import SseConfig
from ..errors import FencedError
from ..fencing import ABANDON, ACQUIRE, FORGET, REGISTER, RELEASE, RENEW, Lease
from ..ids import session_tag
from ..redis_errors import REDIS_FAILURES, redis_errors
from ..redis_store import RedisEventStore

__all__ = ["Directory", "DirectoryEntry"]

logger = logging.getLogger("mcp_sse_transport")

_DROP_STALE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
"""Delete the owner key if it names this worker (ARGV[1]): one this worker holds no lease for."""


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


class Directory:
    """The directory as worker ``worker_id`` sees it: entries, and the leases it holds.

    Entered (``async with``), it renews its leases; leaving, it gives up every lease it may
    still hold. ``on_lost(session_id, gone)`` is called when another worker holds a session's
    lease now, or (``gone``) Redis lost the session.
    """

    def __init__(self, redis: Redis, store: RedisEventStore, config: SseConfig, worker_id: str) -> None:
        self.redis = redis
        self.store = store
        self.config = config
        self.worker_id = worker_id
        self.on_lost: Callable[[str, bool], None] | None = None
        self._owned: set[str] = set()
        """Sessions whose leases this worker renews: the ones it serves."""
        self._held: set[str] = set()
        """Sessions whose leases this worker may still hold in Redis: given up on leaving."""
        self._leases: dict[str, Lease] = {}
        """The fenced leases of the sessions in ``_held``: their generations, and until when
        each is surely valid. The store fences its appends by them."""
        store.leases = self._leases
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._register = redis.register_script(REGISTER)
        self._acquire = redis.register_script(ACQUIRE)
        self._forget = redis.register_script(FORGET)
        self._abandon = redis.register_script(ABANDON)
        self._drop_stale = redis.register_script(_DROP_STALE)
        self._task_group: anyio.abc.TaskGroup | None = None

    def key(self, session_id: str, name: str) -> str:
        """The session's key ``name`` (``owner``, ``meta``, ``pending``, ...)."""
        return f"{self.config.redis_prefix}{{{session_id}}}:{name}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Directory:
        self._task_group = await anyio.create_task_group().__aenter__()
        self._task_group.start_soon(self._renew_leases)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None, "not entered"
        task_group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.forward_timeout):
            await self.release_all()
        return await task_group.__aexit__(exc_type, exc_val, exc_tb)

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
                        keys = [self.key(session_id, name) for name in ("owner", "meta", "pending", "seen")]
                        await self._renew(
                            [*keys, self.store.key(session_id)],
                            [self.worker_id, lease_ms, keep_ms, lease.generation],
                            pipe,
                        )
                    results = await pipe.execute()
            except REDIS_FAILURES as exc:
                logger.warning("cluster: could not renew %d lease(s): %s", len(owned), exc)
                continue
            for (session_id, lease), renewed in zip(owned, results, strict=True):
                if renewed == 1:
                    lease.renewed(sent)
                elif self._leases.get(session_id) is lease:
                    self._lose(session_id, gone=renewed == -1)
                else:  # an older lease of a session taken over anew here meanwhile
                    lease.revoke()

    # -- leases --------------------------------------------------------------------------------

    def _lose(self, session_id: str, gone: bool = False) -> None:
        """This worker's lease of the session is lost: another worker holds it (its renewal or
        another fenced command was refused), or (``gone``) Redis lost the session. Nothing more
        is written for it here; :attr:`on_lost` hands the session off, or ends it."""
        owned = session_id in self._owned
        self._owned.discard(session_id)  # first: the lease's revocation calls back here
        lease = self._leases.get(session_id)
        if lease is not None:
            lease.revoke()
        if owned:
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
            owner_key=self.key(session_id, "owner"),
            meta_key=self.key(session_id, "meta"),
            term=self.config.owner_lease,
            sent=sent,
            timeout=self.config.forward_timeout,
            on_revoked=self._revoked,
        )
        self._owned.add(session_id)
        self._held.add(session_id)

    def fence(self, session_id: str) -> tuple[Lease, list[str], list[str | int]]:
        """The current lease, and the owner and meta keys, the worker id and the generation a
        fenced script checks. Raises :class:`FencedError` when this worker holds no lease."""
        lease = self._leases.get(session_id)
        if lease is None or lease.revoked:
            raise FencedError(f"session {session_tag(session_id)}: this worker holds no lease of it")
        keys, args = lease.fence()
        return lease, keys, args

    def serves(self, session_id: str) -> bool:
        """Whether this worker holds the session's lease, as far as it knows (one revoked, or
        given up, it does not)."""
        lease = self._leases.get(session_id)
        return lease is not None and not lease.revoked

    def renews(self, session_id: str) -> bool:
        """Whether this worker holds a lease of the session: it serves it, or is ending it."""
        return session_id in self._owned or session_id in self._leases

    # -- the directory -------------------------------------------------------------------------

    async def register(self, session_id: str, fingerprint: str, secret: str) -> None:
        """Enter a new session with this worker as its owner."""
        keep_ms = round(self.config.replay_max_age * 1000)
        lease_ms = round(self.config.owner_lease * 1000)
        keys = [self.key(session_id, "owner"), self.key(session_id, "meta")]
        sent = time.monotonic()
        with redis_errors("registering", session_id):
            generation = int(await self._register(keys, [self.worker_id, lease_ms, keep_ms, fingerprint, secret]))
        self._take_lease(session_id, generation, sent)

    async def lookup(self, session_id: str) -> DirectoryEntry | None:
        """The session's entry; ``None`` if Redis does not know it."""
        with redis_errors("looking up", session_id):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.key(session_id, "meta"))
                pipe.get(self.key(session_id, "owner"))
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
        keys = [self.key(session_id, "owner"), self.key(session_id, "meta")]
        sent = time.monotonic()
        with redis_errors("taking over", session_id):
            generation = int(await self._acquire(keys, [self.worker_id, round(self.config.owner_lease * 1000)]))
        if generation <= 0:
            return False
        self._take_lease(session_id, generation, sent)
        return True

    async def drop_stale_lease(self, session_id: str) -> None:
        """Delete the ``owner`` key if it names this worker while this worker holds no lease of
        the session (a lease left behind: its release failed), so the session can be taken
        over, with a new generation, at once. Call it only when :meth:`renews` is False."""
        with redis_errors("dropping a stale lease", session_id):
            await self._drop_stale([self.key(session_id, "owner")], [self.worker_id])

    async def lease_remaining(self, session_id: str) -> float:
        """Seconds until the current owner's lease runs out (0: it has)."""
        with redis_errors("reading the lease", session_id):
            remaining = await self.redis.pttl(self.key(session_id, "owner"))
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
            with redis_errors("releasing", session_id):
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
        with redis_errors("releasing", session_id):
            await self._abandon(*lease.fence())
        self._held.discard(session_id)
        self._leases.pop(session_id, None)

    async def release_all(self) -> None:
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
        except REDIS_FAILURES as exc:
            logger.warning("cluster: could not give up %d lease(s) on leaving: %s", len(held), exc)
        else:
            self._held.clear()
            self._leases.clear()

    async def forget(self, session_id: str, lease: Lease | None = None) -> None:
        """Remove an ended session from the directory, its events and requests included: one
        script, fenced by ``lease`` (default: the current one). Raises :class:`FencedError`,
        deleting nothing, when another lease of the session was taken since (it lives on there)."""
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
        keys += [self.key(session_id, name) for name in ("pending", "seen", "claims")]
        with redis_errors("forgetting", session_id):
            forgotten = await self._forget([*keys, self.store.key(session_id)], args)
        self._held.discard(session_id)
        self._leases.pop(session_id, None)
        if not forgotten:
            raise FencedError(f"session {session_tag(session_id)}: not forgotten, another worker holds it now")
