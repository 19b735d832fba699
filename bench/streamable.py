"""Streamable HTTP: the SDK's ``StreamableHTTPSessionManager`` against ours, side by side.

Each transport in its own server process (``python -m bench.server --impl stock|ours --transport
streamable``: the manager at ``/mcp`` serving the lowlevel ``Server``); the clients are raw HTTP/1.1
over asyncio sockets (the same code for both), plus the SDK's ``streamable_http_client`` for the
full stack. Sections: ``streamable`` (progress notifications/s on a POST's response stream),
``stalled-streamable`` (a stalled response stream and the same session's pings),
``idle-streamable`` (server RSS per idle session) and ``resume-streamable`` (a dropped response
stream resumed with ``Last-Event-ID``; ours only, stock has no event store unless given one).
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from .client import SseStream, _Counter, call_progress, http_get_json, resume_run
from .procs import ServerProc
from .runner import IMPLS, Plan, check_replayed_ids, log, median, order, percentile, spread_of

PATH = "/mcp"
PROTOCOL = "2025-06-18"
"""The protocol version the raw clients speak: a handshake-era session, no priming events."""
SERVER_ARGS = ["--transport", "streamable"]
SLOW_CONSUMER = -32050
"""``ErrorCode.SLOW_CONSUMER``: the ``event: error`` of a stream cut loose."""


# -- a raw Streamable HTTP client ----------------------------------------------------------------


def _post(port: int, message: dict[str, Any], session_id: str | None) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    headers = [
        f"POST {PATH} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Accept: application/json, text/event-stream",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if session_id is not None:
        headers += [f"Mcp-Session-Id: {session_id}", f"MCP-Protocol-Version: {PROTOCOL}"]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def _get(port: int, session_id: str, last_event_id: str | None = None) -> bytes:
    headers = [
        f"GET {PATH} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Accept: text/event-stream",
        f"Mcp-Session-Id: {session_id}",
        f"MCP-Protocol-Version: {PROTOCOL}",
    ]
    if last_event_id is not None:
        headers.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode()


def _header(head: bytes, name: str) -> str | None:
    key = name.lower().encode()
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == key:
            return value.strip().decode()
    return None


def _status(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def _connect(
    port: int, time_limit: float, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the advertised TCP window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), time_limit)
        return await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**16)
    except BaseException:
        sock.close()
        raise


def _abort(writer: asyncio.StreamWriter) -> None:
    with suppress(Exception):
        writer.transport.abort()


class EventReader(SseStream):
    """One response's SSE events, parsed as they complete (chunked HTTP/1.1), each with the
    ``perf_counter()`` of the read that completed it; ``head`` once the head arrived. Unlike
    :class:`SseStream`, any response is read: the caller looks at the status."""

    async def read_head(self, time_limit: float) -> bytes:
        async with asyncio.timeout(time_limit):
            while not self.head:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError(f"closed before the response head: {self._raw[:200]!r}")
                self._raw += chunk
                self._parse(time.perf_counter())
        return self.head

    def _event_stream(self, head: bytes) -> bool:
        return _status(head) == 200 and b"transfer-encoding: chunked" in head.lower()

    def feed(self, chunk: bytes) -> None:
        """Bytes read by the caller instead of :meth:`next_event`."""
        self._raw += chunk
        self._parse(time.perf_counter())

    def take_events(self) -> list[dict[str, str]]:
        """Every complete event not yet taken."""
        events, self._events = self._events, []
        return [event for _, event in events]

    async def response(self, request_id: int, time_limit: float) -> tuple[float, dict[str, Any]]:
        """Read until the JSON-RPC answer to ``request_id``: when it arrived, and the message."""
        deadline = time.perf_counter() + time_limit
        while True:
            item = await self.next_event(max(0.001, deadline - time.perf_counter()))
            if item is None:
                raise ConnectionError(f"the stream ended before the answer to request {request_id}")
            at, event = item
            if event.get("event", "message") != "message" or not event.get("data"):
                continue
            message = json.loads(event["data"])
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return at, message


class StreamableSession:
    """An initialized Streamable HTTP session driven over raw sockets: each POST on a connection
    of its own (its response an event stream), the standalone GET stream on request."""

    def __init__(self, port: int, session_id: str) -> None:
        self.port = port
        self.session_id = session_id
        self.next_id = 2

    @classmethod
    async def open(cls, port: int, time_limit: float = 10) -> StreamableSession:
        params = {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
        reader, writer = await _connect(port, time_limit)
        stream = EventReader(reader, writer)
        try:
            writer.write(_post(port, init, None))
            head = await stream.read_head(time_limit)
            session_id = _header(head, "mcp-session-id")
            if _status(head) != 200 or session_id is None:
                raise RuntimeError(f"initialize answered {head[:300]!r}")
            await stream.response(1, time_limit)
        finally:
            stream.close()
        self = cls(port, session_id)
        status = await self.notify("notifications/initialized", time_limit)
        if status != 202:
            raise RuntimeError(f"notifications/initialized answered {status}")
        return self

    def new_id(self) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        return request_id

    async def post(
        self, message: dict[str, Any], time_limit: float, rcvbuf: int | None = None
    ) -> tuple[EventReader, bytes]:
        """POST ``message`` on a new connection; the reader once the response head arrived."""
        reader, writer = await _connect(self.port, time_limit, rcvbuf)
        stream = EventReader(reader, writer)
        try:
            writer.write(_post(self.port, message, self.session_id))
            head = await stream.read_head(time_limit)
        except BaseException:
            stream.close()
            raise
        return stream, head

    async def notify(self, method: str, time_limit: float) -> int:
        stream, head = await self.post({"jsonrpc": "2.0", "method": method}, time_limit)
        stream.close()
        return _status(head)

    async def call(
        self, method: str, params: dict[str, Any] | None, time_limit: float, rcvbuf: int | None = None
    ) -> tuple[int, EventReader]:
        """POST a request; its id and its response stream (head read, status 200 checked)."""
        request_id = self.new_id()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        stream, head = await self.post(message, time_limit, rcvbuf)
        if _status(head) != 200:
            stream.close()
            raise RuntimeError(f"{method} answered {head[:300]!r}")
        return request_id, stream

    async def ping(self, time_limit: float) -> float:
        """One ping on a POST of its own: the round trip in ms (connect to the answer)."""
        start = time.perf_counter()
        async with asyncio.timeout(time_limit):
            request_id, stream = await self.call("ping", None, time_limit)
            try:
                at, _ = await stream.response(request_id, time_limit)
            finally:
                stream.close()
        return (at - start) * 1000

    async def standalone(self, time_limit: float) -> tuple[asyncio.StreamWriter, bytes]:
        """Open the standalone GET stream and read its head; the connection stays open."""
        reader, writer = await _connect(self.port, time_limit)
        try:
            writer.write(_get(self.port, self.session_id))
            async with asyncio.timeout(time_limit):
                head = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            _abort(writer)
            raise
        if _status(head) != 200:
            _abort(writer)
            raise RuntimeError(f"GET answered {head[:300]!r}")
        return writer, head


@asynccontextmanager
async def sdk_streamable_client(port: int) -> AsyncIterator[Any]:
    """The SDK's Streamable HTTP client, connected to ``/mcp`` and initialized."""
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    async with Client(streamable_http_client(f"http://127.0.0.1:{port}{PATH}"), mode="legacy") as client:
        yield client


async def raw_progress(session: StreamableSession, count: int, time_limit: float) -> dict[str, float]:
    """A raw ``tools/call progress``: count ``event: message`` on its response stream until the
    ``count`` notifications and the answer arrived; notifications/s, request to answer."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    request_id = session.new_id()
    params = {"name": "progress", "arguments": {"count": count}, "_meta": {"progressToken": "raw"}}
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    transport, proto = await asyncio.wait_for(
        loop.create_connection(lambda: _Counter(count + 1, done), "127.0.0.1", session.port), time_limit
    )
    try:
        start = time.perf_counter()
        transport.write(_post(session.port, message, session.session_id))
        end = await asyncio.wait_for(done, time_limit)
        if not proto.head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response {proto.head!r}")
    finally:
        transport.close()
    elapsed = end - start
    return {"notifications": count, "seconds": elapsed, "notifications_per_s": count / elapsed}


async def start_server(impl: str, args: list[str], log_path: Path) -> ServerProc:
    return await ServerProc(impl, [*SERVER_ARGS, *args], log_path).start()


def _ours_args(plan: Plan) -> list[str]:
    return ["--grant-timeout", str(plan.grant_timeout), "--write-timeout", str(plan.write_timeout)]


# -- 7. notifications/s on a POST's response stream ------------------------------------------------

CLIENTS = ("sdk", "raw")
"""Through the SDK's ``streamable_http_client``; through a raw socket counting events."""


async def bench_streamable(plan: Plan, logdir: Path) -> dict[str, Any]:
    procs: dict[str, ServerProc] = {}
    runs: list[dict[str, Any]] = []
    try:
        for impl in IMPLS:
            procs[impl] = await start_server(impl, [], logdir / f"streamable-{impl}.log")
        for round_no in range(plan.full_rounds):
            for impl in order(round_no):
                proc = procs[impl]
                await asyncio.sleep(plan.settle)
                async with sdk_streamable_client(proc.port) as client:
                    await call_progress(client, 200, time_limit=60)  # warm-up call, discarded
                    cpu0 = proc.cpu_seconds()
                    result = await call_progress(client, plan.full_notifications, time_limit=120)
                    result["server_cpu_s"] = proc.cpu_seconds() - cpu0
                runs.append({"impl": impl, "client": "sdk", "round": round_no, **result})
                await asyncio.sleep(plan.settle)
                session = await StreamableSession.open(proc.port)
                await raw_progress(session, 200, time_limit=60)  # warm-up call, discarded
                cpu0 = proc.cpu_seconds()
                raw = await raw_progress(session, plan.full_notifications, time_limit=120)
                raw["server_cpu_s"] = proc.cpu_seconds() - cpu0
                runs.append({"impl": impl, "client": "raw", "round": round_no, **raw})
                log(
                    f"streamable round {round_no + 1}/{plan.full_rounds}  {impl:5}  "
                    f"{result['notifications_per_s']:>9,.0f} notifications/s (SDK client), "
                    f"{raw['notifications_per_s']:>9,.0f} (raw client)"
                )
    finally:
        await asyncio.gather(*(proc.stop() for proc in procs.values()))
    return {"runs": runs, "summary": summarize_streamable(runs, plan)}


def summarize_streamable(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {"notifications": plan.full_notifications}
    for client in CLIENTS:
        row: dict[str, Any] = {}
        for impl in IMPLS:
            mine = [r for r in runs if r["impl"] == impl and r["client"] == client]
            if not mine:
                break
            row[impl] = {
                "notifications_per_s": median([r["notifications_per_s"] for r in mine]),
                "min": min(r["notifications_per_s"] for r in mine),
                "max": max(r["notifications_per_s"] for r in mine),
                "server_cpu_us_per_notification": median([r["server_cpu_s"] / r["notifications"] * 1e6 for r in mine]),
            }
        else:
            row["ratio"] = row["ours"]["notifications_per_s"] / row["stock"]["notifications_per_s"]
            summary[client] = row
    return summary


# -- 8. a stalled response stream, and the same session's pings ------------------------------------


async def ping_schedule(
    session: StreamableSession, seconds: float, interval: float, ping_timeout: float, t_ref: float | None = None
) -> list[dict[str, Any]]:
    """A ping every ``interval`` s for ``seconds``, each on a POST of its own and not waiting for
    the one before (a blocked session cannot slow the schedule down), each given ``ping_timeout`` s.
    Per ping: when it started (s after ``t_ref``), its round trip in ms, or its failure."""
    t0 = time.perf_counter()
    ref = t0 if t_ref is None else t_ref

    async def one() -> dict[str, Any]:
        start = time.perf_counter()
        try:
            rtt: float | None = await session.ping(ping_timeout)
            error = None
        except TimeoutError:
            rtt, error = None, "timeout"
        except (OSError, RuntimeError) as exc:
            rtt, error = None, f"{type(exc).__name__}: {exc}"[:200]
        return {"start_s": start - ref, "rtt_ms": rtt, "error": error}

    tasks: list[asyncio.Task[dict[str, Any]]] = []
    for k in range(max(1, round(seconds / interval))):
        delay = t0 + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    return list(await asyncio.gather(*tasks))


async def _drain(stream: EventReader, call_id: int, time_limit: float, max_bytes: int = 64 << 20) -> dict[str, Any]:
    """Read what the stalled stream still delivers (for ``time_limit`` s at most, or until it
    ends): whether it carries the ``SLOW_CONSUMER`` error event and a JSON-RPC error for the call."""
    drained = 0
    ended = False
    deadline = time.perf_counter() + time_limit
    while drained < max_bytes and not stream.eof:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(stream.reader.read(1 << 20), remaining)
        except TimeoutError:
            break
        except (ConnectionError, OSError):
            chunk = b""
        if not chunk:
            ended = True
            break
        drained += len(chunk)
        stream.feed(chunk)
    ended = ended or stream.eof
    events = stream.take_events()
    slow = [e for e in events if e.get("event") == "error" and str(SLOW_CONSUMER) in e.get("data", "")]
    answer: dict[str, Any] | None = None
    for e in events:
        if e.get("event", "message") == "message" and e.get("data", "").startswith("{"):
            message = json.loads(e["data"])
            if message.get("id") == call_id:
                answer = message
    return {
        "drained_bytes": drained,
        "drained_events": len(events),
        "stream_ended": ended,
        "slow_consumer_event": bool(slow),
        "call_answer": None if answer is None else ("error" if "error" in answer else "result"),
        "call_error_code": (answer or {}).get("error", {}).get("code"),
    }


async def _stall_streamable_once(plan: Plan, proc: ServerProc, round_no: int) -> dict[str, Any]:
    session = await StreamableSession.open(proc.port)
    samples: list[tuple[float, int]] = []
    t_open: float | None = None
    stalled: EventReader | None = None

    async def sample_rss() -> None:
        for _ in range(20_000):  # 1,000 s at most; cancelled long before
            if t_open is not None:
                samples.append((time.perf_counter() - t_open, proc.rss_kib()))
            await asyncio.sleep(0.05)

    interval, timeout = plan.stream_ping_interval, plan.stream_ping_timeout
    window = plan.stream_stall_window
    # The tool pushes for the whole window and a second more (then gives up: a stock session stays
    # blocked anyway, its router stuck on the stalled stream; ours has long cut the stream loose).
    cap = window + 1.0
    sampler = asyncio.create_task(sample_rss())
    try:
        await ping_schedule(session, 0.3, interval, timeout)  # warm-up
        baseline = await ping_schedule(session, plan.baseline_seconds, interval, timeout)
        await asyncio.sleep(plan.settle)
        gc.collect()
        rss0 = proc.rss_kib()
        tag = uuid.uuid4().hex
        arguments = {"tag": tag, "size": plan.stall_payload, "cap": cap}
        params = {"name": "flood", "arguments": arguments, "_meta": {"progressToken": "stall"}}
        # The stalled client: a tiny receive window; reads the response head, then nothing.
        call_id, stalled = await session.call("tools/call", params, 10, rcvbuf=4096)
        t_open = time.perf_counter()
        during = await ping_schedule(session, window, interval, timeout, t_ref=t_open)
        stats: dict[str, Any] = await http_get_json(proc.port, f"/stats?tag={tag}", 5)
        pings_done = time.perf_counter() - t_open
        drained = await _drain(stalled, call_id, plan.write_timeout + 2 if proc.impl == "ours" else 1.0)
    finally:
        sampler.cancel()
        if stalled is not None:
            stalled.close()
    if not samples:
        samples.append((0.0, rss0))
    # The producer (the tool) is released when its send that waited for room returns (ours: the
    # stream cut loose, what it sends from then on is dropped) or fails, short of the tool's cap.
    pending = stats.get("pending_for")
    capped = stats.get("error") == "TimeoutError"
    at = stats.get("max_send_wait_at")
    released = pending is None and at is not None and not (capped and abs((stats.get("released") or 0) - at) < 1e-3)
    peak = max(rss for _, rss in samples)
    return {
        "impl": proc.impl,
        "round": round_no,
        "released": released,
        "error": stats.get("error"),
        "released_after_open_s": at if released else None,
        "release_send_wait_s": stats.get("max_send_wait") if released else None,
        "blocked_s": pending if pending is not None else (stats.get("release_send_wait") if capped else None),
        "events_sent": stats.get("sent"),
        "last_ok_s": stats.get("last_ok"),
        "tool_cap_s": cap,
        "window_s": window,
        "pings_done_s": pings_done,
        "rss_before_kib": rss0,
        "rss_peak_growth_kib": peak - rss0,
        "rss_end_growth_kib": samples[-1][1] - rss0,
        "rss_samples": samples,
        "baseline": baseline,
        "during": during,
        **drained,
    }


def _ping_stats(pings: list[dict[str, Any]]) -> dict[str, Any]:
    rtts = [p["rtt_ms"] for p in pings if p["rtt_ms"] is not None]
    return {
        "pings": len(pings),
        "answered": len(rtts),
        "timeouts": sum(1 for p in pings if p["error"] == "timeout"),
        "errors": sum(1 for p in pings if p["error"] not in (None, "timeout")),
        "p50_ms": percentile(rtts, 50) if rtts else None,
        "p99_ms": percentile(rtts, 99) if rtts else None,
        "max_ms": max(rtts) if rtts else None,
    }


async def bench_stalled_streamable(plan: Plan, logdir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for round_no in range(plan.stall_rounds):
        for impl in order(round_no):
            # A fresh server per run, so RSS growth is not hidden by memory a previous run freed.
            args = _ours_args(plan) if impl == "ours" else []
            proc = await start_server(impl, args, logdir / f"stalled-streamable-{impl}.log")
            try:
                result = await _stall_streamable_once(plan, proc, round_no)
            finally:
                await proc.stop()
            runs.append(result)
            during = _ping_stats(result["during"])
            base = _ping_stats(result["baseline"])
            rel = (
                f"producer released after a {result['release_send_wait_s']:.2f} s wait"
                if result["released"]
                else f"producer not released (blocked {_num(result['blocked_s'])} s, until the tool's cap)"
            )
            log(
                f"stalled-streamable round {round_no + 1}/{plan.stall_rounds}  {impl:5}  {rel}; "
                f"RSS +{result['rss_peak_growth_kib'] / 1024:.1f} MiB peak; pings answered "
                f"{during['answered']}/{during['pings']} ({during['timeouts']} timeouts), p99 "
                f"{_num(base['p99_ms'])} -> {_num(during['p99_ms'])} ms; slow-consumer event "
                f"{'seen' if result['slow_consumer_event'] else 'not seen'}, call answer {result['call_answer']}"
                f"{'' if result['call_error_code'] is None else ' ' + str(result['call_error_code'])}"
            )
    return {"runs": runs, "summary": summarize_stalled_streamable(runs, plan)}


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def summarize_stalled_streamable(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "grant_timeout_s": plan.grant_timeout,
        "write_timeout_s": plan.write_timeout,
        "payload_bytes": plan.stall_payload,
        "window_s": plan.stream_stall_window,
        "tool_cap_s": plan.stream_stall_window + 1.0,
        "ping_interval_s": plan.stream_ping_interval,
        "ping_timeout_s": plan.stream_ping_timeout,
    }
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        if not mine:
            continue
        waits = [r["release_send_wait_s"] for r in mine if r["released"]]
        summary[impl] = {
            "runs": len(mine),
            "released_runs": len(waits),
            "errors": sorted({str(r["error"]) for r in mine if r["error"]}),
            "release_send_wait_s": median(waits),
            "released_after_open_s": median([r["released_after_open_s"] for r in mine if r["released"]]),
            "blocked_s": median([r["blocked_s"] for r in mine if r["blocked_s"] is not None]),
            "events_sent": median([r["events_sent"] for r in mine if r["events_sent"] is not None]),
            "rss_peak_growth_kib": median([r["rss_peak_growth_kib"] for r in mine]),
            "rss_end_growth_kib": median([r["rss_end_growth_kib"] for r in mine]),
            "slow_consumer_event_runs": sum(1 for r in mine if r["slow_consumer_event"]),
            "call_answers": sorted({f"{r['call_answer']} {r['call_error_code'] or ''}".strip() for r in mine}),
            # all rounds' pings pooled
            "baseline": _ping_stats([p for r in mine for p in r["baseline"]]),
            "during": _ping_stats([p for r in mine for p in r["during"]]),
        }
    return summary


# -- 9. idle sessions --------------------------------------------------------------------------


async def _open_idle(port: int, count: int, concurrency: int, time_limit: float) -> list[asyncio.StreamWriter]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> asyncio.StreamWriter:
        async with sem:
            session = await StreamableSession.open(port, time_limit)
            writer, _ = await session.standalone(time_limit)
            return writer

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _idle_streamable_once(plan: Plan, proc: ServerProc, round_no: int) -> dict[str, Any]:
    held: list[asyncio.StreamWriter] = []
    try:
        for writer in await _open_idle(proc.port, 20, 20, 10):  # warm-up: first-session allocations
            _abort(writer)
        await asyncio.sleep(1.0)
        rss0 = proc.rss_kib()
        curve = [(0, rss0)]
        while len(held) < plan.idle_sessions:
            step = min(plan.idle_step, plan.idle_sessions - len(held))
            held += await _open_idle(proc.port, step, 50, 30)
            await asyncio.sleep(0.3)
            curve.append((len(held), proc.rss_kib()))
        await asyncio.sleep(1.0)
        rss_n = proc.rss_kib()
        curve[-1] = (len(held), rss_n)
    finally:
        for writer in held:
            _abort(writer)
    return {
        "impl": proc.impl,
        "round": round_no,
        "sessions": len(held),
        "rss_before_kib": rss0,
        "rss_after_kib": rss_n,
        "kib_per_session": (rss_n - rss0) / len(held),
        "curve": curve,
    }


async def bench_idle_streamable(plan: Plan, logdir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for round_no in range(plan.idle_rounds):
        for impl in order(round_no):
            proc = await start_server(impl, [], logdir / f"idle-streamable-{impl}.log")
            try:
                result = await _idle_streamable_once(plan, proc, round_no)
            finally:
                await proc.stop()
            runs.append(result)
            log(
                f"idle-streamable round {round_no + 1}/{plan.idle_rounds}  {impl:5}  "
                f"{result['kib_per_session']:.1f} KiB/session ({result['sessions']} sessions, each a GET stream)"
            )
            await asyncio.sleep(plan.settle)
    return {"runs": runs, "summary": summarize_idle_streamable(runs, plan)}


def summarize_idle_streamable(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {"sessions": plan.idle_sessions}
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        if not mine:
            return summary
        summary[impl] = {
            "kib_per_session": median([r["kib_per_session"] for r in mine]),
            "min": min(r["kib_per_session"] for r in mine),
            "max": max(r["kib_per_session"] for r in mine),
            "rss_before_kib": median([r["rss_before_kib"] for r in mine]),
            "curve": [
                (n, median([r["curve"][i][1] - r["rss_before_kib"] for r in mine]))
                for i, (n, _) in enumerate(mine[0]["curve"])
            ],
        }
    summary["ratio"] = summary["ours"]["kib_per_session"] / summary["stock"]["kib_per_session"]
    return summary


# -- 10. resume a dropped response stream --------------------------------------------------------


async def _first_progress(stream: EventReader, time_limit: float) -> dict[str, str]:
    """Read the response stream until its first progress notification (priming events skipped)."""
    deadline = time.perf_counter() + time_limit
    while True:
        item = await stream.next_event(max(0.001, deadline - time.perf_counter()))
        if item is None:
            raise ConnectionError("the response stream ended before its first notification")
        if "notifications/progress" in item[1].get("data", ""):
            return item[1]


async def _resume_streamable_cycle(proc: ServerProc, n: int, size: int, time_limit: float = 30) -> dict[str, Any]:
    """A ``tools/call replay``: read its first progress notification, drop the connection; once
    the server saw it go, the tool sends ``n`` more and answers; then a GET with the session id
    and ``Last-Event-ID`` set to the first notification's id, timed to the first replayed event and
    to the last (the answer), and checked: the ``n`` notifications in order, then the answer,
    every id once, right after the one the client saw."""
    session = await StreamableSession.open(proc.port, time_limit)
    tag = uuid.uuid4().hex
    params = {"name": "replay", "arguments": {"tag": tag, "n": n, "size": size}, "_meta": {"progressToken": "r"}}
    call_id, stream = await session.call("tools/call", params, time_limit)
    try:
        first = await _first_progress(stream, time_limit)
    finally:
        stream.close()  # abort, as a client whose network went away
    last_id = first.get("id")
    if last_id is None:
        raise RuntimeError(f"{proc.label}: the first notification has no id: {first}")
    stream_id = last_id.partition(".")[0]
    rss0 = proc.rss_kib()
    query = f"tag={tag}&session={session.session_id}&stream={stream_id}"
    go = await http_get_json(proc.port, f"/replay/go?{query}", time_limit + 5)
    if go.get("error") or go.get("sent") != n:
        raise RuntimeError(f"{proc.label}: the tool did not send {n} notifications into the dropped stream: {go}")
    rss_held = proc.rss_kib()
    cpu0 = proc.cpu_seconds()
    headers = {"Mcp-Session-Id": session.session_id, "MCP-Protocol-Version": PROTOCOL}
    result = await resume_run_with(proc.port, last_id, n + 1, time_limit, headers)
    cpu = proc.cpu_seconds() - cpu0
    events = result.pop("events")
    messages = [e for e in events if e.get("event", "message") == "message" and e.get("data")]
    ids = [e.get("id") for e in messages]
    check_replayed_ids(ids, last_id, n + 1)
    decoded = [json.loads(e["data"]) for e in messages]
    progress = [m.get("params", {}).get("progress") for m in decoded[:-1]]
    if progress != list(range(2, n + 2)):
        raise RuntimeError(f"replayed progress out of order: first {progress[:3]}, last {progress[-3:]}")
    answer = decoded[-1]
    if answer.get("id") != call_id or "result" not in answer:
        raise RuntimeError(f"the replay does not end with the call's answer: {answer}")
    others = sorted({str(e.get("event")) for e in events if e not in messages})
    return {
        **result,
        "events": n,
        "payload_bytes": size,
        "events_per_s": (n + 1) / result["all_s"],
        "server_cpu_s": cpu,
        "produce_s": go["produce_s"],
        "detach_wait_s": go["detach_wait_s"],
        "other_events": others,
        "rss_before_kib": rss0,
        "rss_held_growth_kib": rss_held - rss0,
    }


async def resume_run_with(
    port: int, last_event_id: str, n: int, time_limit: float, headers: dict[str, str]
) -> dict[str, Any]:
    """:func:`bench.client.resume_run` on ``/mcp`` with the session's headers."""
    return await resume_run(port, PATH, last_event_id, n, time_limit, headers)


async def _stock_resume_probe(logdir: Path) -> dict[str, Any]:
    """What stock (no event store: the SDK ships none) does for a client whose response stream
    broke: do its events carry an id, and what does a GET with ``Last-Event-ID`` get?"""
    proc = await start_server("stock", [], logdir / "resume-streamable-stock.log")
    try:
        session = await StreamableSession.open(proc.port)
        params = {"name": "progress", "arguments": {"count": 1}, "_meta": {"progressToken": "p"}}
        call_id, stream = await session.call("tools/call", params, 10)
        try:
            first = await _first_progress(stream, 10)
            await stream.response(call_id, 10)
        finally:
            stream.close()
        reader, writer = await _connect(proc.port, 10)
        status: int | str
        try:
            writer.write(_get(proc.port, session.session_id, first.get("id") or f"{session.session_id}:1"))
            async with asyncio.timeout(5):
                status = _status(await reader.readuntil(b"\r\n\r\n"))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            status = type(exc).__name__
        finally:
            _abort(writer)
    finally:
        await proc.stop()
    return {"impl": "stock", "probe": True, "event_has_id": "id" in first, "resume_status": status}


async def bench_resume_streamable(plan: Plan, logdir: Path) -> dict[str, Any]:
    n = plan.streamable_resume_events
    if n + 2 > 1000:  # the dropped stream buffers them, and the answer, in SseConfig's 1,000 events
        raise ValueError("streamable_resume_events must be < 998")
    runs: list[dict[str, Any]] = []
    probe = await _stock_resume_probe(logdir)
    runs.append(probe)
    log(
        f"resume-streamable stock  events carry an id: {'yes' if probe['event_has_id'] else 'no'}; "
        f"GET with Last-Event-ID answered {probe['resume_status']} (no event store: no resumption)"
    )
    for round_no in range(plan.resume_rounds):
        proc = await start_server("ours", [], logdir / "resume-streamable-ours.log")
        try:
            await _resume_streamable_cycle(proc, plan.resume_warmup_events, plan.resume_payload)  # warm-up
            await asyncio.sleep(plan.settle)
            result = await _resume_streamable_cycle(proc, n, plan.resume_payload)
        finally:
            await proc.stop()
        runs.append({"impl": "ours", "round": round_no, **result})
        log(
            f"resume-streamable round {round_no + 1}/{plan.resume_rounds}  ours  first replayed event after "
            f"{result['first_s'] * 1000:.2f} ms, all {n:,} and the answer after {result['all_s'] * 1000:.1f} ms "
            f"({result['events_per_s']:,.0f} events/s); exactly once, in order; RSS +{result['rss_held_growth_kib']:,}"
            " KiB held"
        )
    return {"runs": runs, "summary": summarize_resume_streamable(runs, plan)}


def summarize_resume_streamable(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    ours = [r for r in runs if r["impl"] == "ours"]
    probe = next((r for r in runs if r["impl"] == "stock"), None)

    def spread(key: str, scale: float = 1.0) -> dict[str, float | None]:
        return spread_of(ours, key, scale)

    return {
        "events": plan.streamable_resume_events,
        "payload_bytes": plan.resume_payload,
        "rounds": len(ours),
        "ours": {
            "head_ms": spread("head_s", 1000),
            "first_event_ms": spread("first_s", 1000),
            "all_events_ms": spread("all_s", 1000),
            "events_per_s": spread("events_per_s"),
            "server_cpu_us_per_event": median([r["server_cpu_s"] / (r["events"] + 1) * 1e6 for r in ours]),
            "produce_ms": median([r["produce_s"] * 1000 for r in ours]),
            "detach_wait_ms": median([r["detach_wait_s"] * 1000 for r in ours]),
            "rss_held_growth_kib": spread("rss_held_growth_kib"),
        }
        if ours
        else None,
        "stock": None
        if probe is None
        else {"event_has_id": probe["event_has_id"], "resume_status": probe["resume_status"]},
    }


BENCHES = {
    "streamable": bench_streamable,
    "stalled-streamable": bench_stalled_streamable,
    "idle-streamable": bench_idle_streamable,
    "resume-streamable": bench_resume_streamable,
}
SUMMARIZERS = {
    "streamable": summarize_streamable,
    "stalled-streamable": summarize_stalled_streamable,
    "idle-streamable": summarize_idle_streamable,
    "resume-streamable": summarize_resume_streamable,
}
