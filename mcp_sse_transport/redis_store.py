"""The replay log on Redis Streams, shared by every worker of a scaled-out deployment.

One stream per session, at ``{prefix}{<session id>}:events``: the braces are a Redis Cluster hash
tag, so every key of a session lands in one slot. Tokens are the entries' ids, which Redis
generates (``<ms>-<seq>``) increasing. Retention: an exact ``MAXLEN`` on append, ``MINID`` by age
on replay and trim, and a ``PEXPIRE`` on every append that drops idle sessions. Entry fields:
``e`` the event name (empty for none), ``d`` the data, ``p`` the id of the entry before it.

Why ``p``: a resume must know whether events after its token were trimmed, and Redis does not
record what trimming removed (``max-deleted-entry-id`` follows ``XDEL`` only). Trimming takes
the oldest entries, so the newest trimmed one is the first retained entry's ``p`` (or, when
none is retained, the stream's ``last-generated-id``): events after ``after`` were lost exactly
when it is newer than ``after``. ``p`` is read inside the append's script, so it is exact
whichever worker appended. Needs Redis 6.2 or newer (exclusive ranges).

Needs the ``redis`` extra; the client is the caller's (``redis.asyncio.Redis``, created with
``decode_responses=False``, the default).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import anyio
from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

from .errors import FencedError, StoreError
from .fencing import Lease
from .ids import session_tag
from .redis_errors import REDIS_FAILURES, store_error
from .store import BEFORE_FIRST, Replay, StoredEvent

__all__ = ["RedisEventStore"]

_APPEND = """
if #KEYS == 3 then
  local generation = redis.call('HGET', KEYS[3], 'g')
  if not generation then return redis.error_reply('GONE the session is no longer in Redis') end
  local owner = redis.call('GET', KEYS[2])
  if generation ~= ARGV[6] or (owner and owner ~= ARGV[5]) then
    return redis.error_reply('FENCED another worker holds the session now')
  end
end
local prev = '0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then prev = info[i + 1] break end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'e', ARGV[3], 'd', ARGV[4], 'p', prev)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
"""
"""``XADD *`` with an exact ``MAXLEN`` and the previous id, then renew the expiry: one round trip.
KEYS: the stream; ARGV: max_events, max_age in ms, event name, data. Fenced (an owner's append,
see :mod:`~mcp_sse_transport.fencing`), KEYS also hold the session's owner and meta keys, ARGV
the worker id and the lease's generation: nothing is appended, and the error is ``FENCED``,
unless that generation is still the session's and no other worker holds the owner key (``GONE``
when the session's meta is gone)."""

_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_PART = 2**64 - 1

StreamId = tuple[int, int]


def _parse_id(token: str) -> StreamId | None:
    """``(ms, seq)`` of a well-formed stream id, else ``None`` (so nothing malformed or
    oversized reaches Redis, and ids compare as numbers, not strings)."""
    match = _STREAM_ID.fullmatch(token)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms <= _MAX_PART and seq <= _MAX_PART else None


def _token_id(token: str) -> StreamId | None:
    return (0, 0) if token == BEFORE_FIRST else _parse_id(token)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fenced(entry: _Append, result: BaseException) -> BaseException:
    """A ``FENCED`` refusal of the append's script as a :class:`FencedError`, a ``GONE`` one as
    a :class:`StoreError` that is not transient (trying again cannot help); else ``result``."""
    if not entry.fence or not str(result).startswith(("FENCED", "GONE")):
        return result
    tag = session_tag(entry.session_id)
    if str(result).startswith("FENCED"):
        refused: StoreError = FencedError(f"append for session {tag} refused: another worker holds the session now")
    else:
        refused = StoreError(f"append for session {tag} refused: Redis no longer knows the session")
        refused.transient = False
    refused.__cause__ = result
    return refused


class _Append:
    """One append waiting in the store's batch: its arguments, then its outcome."""

    __slots__ = ("abandoned", "args", "done", "failure", "fence", "key", "lead", "lease", "session_id", "token")

    def __init__(self, session_id: str, key: str, args: list[EncodableT], lease: Lease | None = None) -> None:
        self.session_id = session_id
        self.key = key
        self.args = args
        self.lease = lease
        """The owner's lease the append is fenced by (``None``: unconditional)."""
        self.fence: list[str] = []
        """The keys the fenced script checks, after the stream (its arguments follow ``args``)."""
        if lease is not None:
            self.fence, fence_args = lease.fence()
            self.args = [*args, *fence_args]
        self.done = anyio.Event()
        self.lead = False
        """Woken to send the next batch, not because this append is done."""
        self.abandoned = False
        """Its caller was cancelled while waiting: it still goes out, but cannot send a batch."""
        self.token: str | None = None
        self.failure: BaseException | None = None


class RedisEventStore:
    """An :class:`~mcp_sse_transport.store.EventStore` on Redis Streams.

    Appends queue up and go out in batches, one pipeline (one round trip, one connection) per
    batch: Redis runs them in order, so a session's tokens follow call order, and appends that
    arrive together, from any sessions, share a round trip instead of waiting for one each. One
    caller at a time sends a batch and hands over to the next waiting one, so nobody sends for
    others for long. Every Redis failure is raised as :class:`StoreError`, the original as its
    cause.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mcp-sse:",
        max_events: int = 2000,
        max_age: float = 300.0,
    ) -> None:
        if max_events < 1 or not (max_age > 0 and math.isfinite(max_age)):
            raise ValueError("max_events and max_age must be positive")
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must be created with decode_responses=False: events are bytes")
        self.redis = redis
        self.prefix = prefix
        self.max_events = max_events
        self.max_age = max_age
        self._max_age_ms = max(1, math.ceil(max_age * 1000))
        self._batch: list[_Append] = []
        self._sending = False
        self._append = redis.register_script(_APPEND)
        self.leases: Mapping[str, Lease] | None = None
        """Set by the cluster: every append is then fenced by its session's lease (one round
        trip still: the check runs in the append's script), and refused without one."""

    def key(self, session_id: str) -> str:
        """The session's stream (hash-tagged by the session, like its other keys)."""
        return f"{self.prefix}{{{session_id}}}:events"

    def _fail(self, operation: str, session_id: str, exc: BaseException) -> NoReturn:
        raise store_error(operation, session_id, exc) from exc

    def _min_id(self) -> str:
        """Entries with smaller ids than this (their Redis time, in ms) are older than ``max_age``."""
        return f"{max(0, int(time.time() * 1000) - self._max_age_ms)}-0"

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        """Add one event (``XADD *`` with an exact ``MAXLEN`` and the key's expiry renewed, in a
        script); returns its entry id once Redis has it."""
        return (await self.append_many(session_id, [(event, data)]))[0]

    async def append_many(self, session_id: str, events: Sequence[tuple[str | None, bytes]]) -> list[str]:
        """Add ``(event, data)`` pairs in order, in one round trip; returns their entry ids.
        Fenced, raises :class:`FencedError` when the session's lease is lost (Redis refused it)."""
        key = self.key(session_id)
        lease = await self._lease(session_id) if events else None
        entries = [
            _Append(
                session_id,
                key,
                [self.max_events, self._max_age_ms, b"" if event is None else event.encode(), data],
                lease,
            )
            for event, data in events
        ]
        if not entries:
            return []
        self._batch.extend(entries)  # no await before: the queue is in call order, and one batch takes all
        first = entries[0]
        if self._sending:
            try:
                await first.done.wait()
            except BaseException:
                for entry in entries:
                    entry.abandoned = True
                if first.lead:  # handed the batch just as it was cancelled: send it anyway
                    with anyio.CancelScope(shield=True):
                        await self._lead()
                raise
            if not first.lead:
                return [self._outcome(entry) for entry in entries]
        self._sending = True
        # Shielded: the appends of other callers ride on this one's round trip.
        with anyio.CancelScope(shield=True):
            await self._lead()
        return [self._outcome(entry) for entry in entries]

    async def _lease(self, session_id: str) -> Lease | None:
        """The lease that fences the session's appends, once it is valid (``None``: unfenced).
        Raises :class:`FencedError` when this worker holds none, or it is lost."""
        if self.leases is None:
            return None
        lease = self.leases.get(session_id)
        if lease is None:
            raise FencedError(f"append for session {session_tag(session_id)} refused: this worker holds no lease")
        await lease.hold()
        lease.wrote = True
        return lease

    async def _lead(self) -> None:
        """Send what is queued, then hand the next batch to a waiting caller, or stop sending."""
        while True:
            batch, self._batch = self._batch, []
            await self._send(batch)
            successor = next((entry for entry in self._batch if not entry.abandoned), None)
            if successor is not None:
                successor.lead = True
                successor.done.set()
                return
            if not self._batch:
                self._sending = False
                return
            # Only abandoned appends are queued: nobody else will send them.

    async def _send(self, batch: list[_Append]) -> None:
        """One round trip for the whole batch; each append gets its token or its failure."""
        results: list[Any]
        try:
            if len(batch) == 1:  # the script object itself, which loads the script when Redis lost it
                results = [await self._append(keys=[batch[0].key, *batch[0].fence], args=batch[0].args)]
            else:
                results = await self._send_pipelined(batch)
                if isinstance(results[0], NoScriptError):  # Redis restarted: none of them ran
                    await self.redis.script_load(_APPEND)
                    results = await self._send_pipelined(batch)
        except Exception as exc:  # any failure to send fails every append of the batch
            results = [exc] * len(batch)
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                entry.failure = _fenced(entry, result)
            else:
                entry.token = _text(result)
            entry.lead = False
            entry.done.set()

    async def _send_pipelined(self, batch: list[_Append]) -> list[Any]:
        # EVALSHA by hand: a Script in a pipeline asks SCRIPT EXISTS first, a round trip more.
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in batch:
                pipe.evalsha(self._append.sha, 1 + len(entry.fence), entry.key, *entry.fence, *entry.args)
            return await pipe.execute(raise_on_error=False)

    def _outcome(self, entry: _Append) -> str:
        if isinstance(entry.failure, StoreError):  # refused by the fence
            if isinstance(entry.failure, FencedError) and entry.lease is not None:
                entry.lease.revoke()  # another worker took the session over: stop serving it
            raise entry.failure
        if entry.token is None:
            self._fail("append", entry.session_id, entry.failure or RuntimeError("append was not sent"))
        return entry.token

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        """Events with ids after ``after`` up to and including ``until``, at most ``limit`` of
        them (``XRANGE ... COUNT``), age-trimmed first; one ``MULTI`` round trip, so the gap flag
        and the events agree.

        ``None`` when the stream does not exist (unless ``after`` is :data:`BEFORE_FIRST`), or
        ``after`` is malformed or newer than any id this stream generated. ``ValueError`` for a
        malformed ``until``.
        """
        after_id = _token_id(after)
        if after_id is None:
            return None
        if until is None:
            end = "+"
        else:
            until_id = _token_id(until)
            if until_id is None:
                raise ValueError("until is not a token of this store")
            end = f"{until_id[0]}-{until_id[1]}"
        start = f"({after_id[0]}-{after_id[1]}"  # exclusive
        if after_id == (_MAX_PART, _MAX_PART):  # nothing can follow it, and "(" would be an error
            start, end = "+", "-"
        key = self.key(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.xtrim(key, minid=self._min_id(), approximate=False)
                pipe.xinfo_stream(key)
                pipe.xrange(key, min=start, max=end, count=limit)
                exists, trimmed, info, entries = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as exc:
            self._fail("replay", session_id, exc)
        if not exists:
            return Replay([], gap=False) if after == BEFORE_FIRST else None
        for result in (trimmed, info, entries):
            if isinstance(result, Exception):
                self._fail("replay", session_id, result)
        last_id, trimmed_id = self._ids(session_id, info)
        if after_id > last_id:
            return None
        events = [
            StoredEvent(_text(entry_id), _text(fields.get(b"e", b"")) or None, bytes(fields.get(b"d", b"")))
            for entry_id, fields in entries
        ]
        return Replay(events, gap=trimmed_id > after_id)

    def _ids(self, session_id: str, info: dict[str, Any]) -> tuple[StreamId, StreamId]:
        """From ``XINFO STREAM``: the newest id generated, and the newest id trimmed (``0-0``:
        none), which is the first retained entry's ``p``, or the newest id if none is retained."""
        last = _parse_id(_text(info.get("last-generated-id", b"")))
        first = info.get("first-entry")
        if first is None or first[0] is None:
            trimmed = last
        else:
            prev = first[1].get(b"p")
            trimmed = None if prev is None else _token_id(_text(prev))
        if last is None or trimmed is None:
            raise StoreError(
                f"replay for session {session_tag(session_id)} failed: the stream was not written by this store"
            )
        return last, trimmed

    async def trim(self, session_id: str) -> None:
        """Drop the events older than ``max_age`` now (``XTRIM MINID``, exact)."""
        try:
            await self.redis.xtrim(self.key(session_id), minid=self._min_id(), approximate=False)
        except REDIS_FAILURES as exc:
            self._fail("trim", session_id, exc)

    async def drop(self, session_id: str) -> None:
        """Delete the session's stream."""
        try:
            await self.redis.delete(self.key(session_id))
        except REDIS_FAILURES as exc:
            self._fail("drop", session_id, exc)

    async def last_token(self, session_id: str) -> str | None:
        """The newest token issued for the session (the stream's ``last-generated-id``, even if
        that entry was trimmed), ``None`` when the stream does not exist. For a worker taking a
        session over."""
        key = self.key(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.xinfo_stream(key)
                exists, info = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as exc:
            self._fail("last_token", session_id, exc)
        if not exists:
            return None
        if isinstance(info, Exception):
            self._fail("last_token", session_id, info)
        return _text(info["last-generated-id"])
