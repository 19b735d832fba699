"""The measurements. Each one runs the stock and our transport in separate server processes,
alternating which goes first from round to round, and keeps every raw sample."""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import (
    RawMcpSession,
    RawSession,
    SseStream,
    call_progress,
    http_get_json,
    open_many,
    post_json,
    push_run,
    read_first_message,
    resume_run,
    sdk_client,
)
from .procs import RedisProc, ServerProc

IMPLS = ("stock", "ours")


@dataclass(frozen=True)
class Plan:
    """What to run; ``quick()`` is the ~1 minute variant."""

    rounds: int = 5
    sizes: tuple[int, ...] = (64, 200, 1024, 16384, 262144)
    events: tuple[tuple[int, int], ...] = ((64, 60000), (200, 60000), (1024, 60000), (16384, 8000), (262144, 800))
    full_rounds: int = 5
    full_notifications: int = 5000
    stall_rounds: int = 3
    stall_payload: int = 1024
    grant_timeout: float = 2.0
    write_timeout: float = 5.0
    stall_cap: float = 10.0
    baseline_seconds: float = 2.0
    idle_rounds: int = 3
    idle_sessions: int = 1000
    idle_step: int = 100
    resume_rounds: int = 5
    # Missed events to replay: at most SseConfig.max_buffered_events (1,000), since a detached
    # session buffers what its server produces until the resume; more would block the producer.
    resume_events: int = 1000
    resume_payload: int = 200
    resume_warmup_events: int = 50
    settle: float = 0.2
    # Streamable HTTP (bench/streamable.py); the full stack, stalled and idle sections reuse the
    # fields above (full_*, stall_*, grant/write_timeout, baseline_seconds, idle_*, resume_*).
    stream_stall_window: float = 6.0
    """Seconds of pings while the stalled response stream is held (ours cuts it loose within)."""
    stream_ping_interval: float = 0.05
    stream_ping_timeout: float = 5.0
    streamable_resume_events: int = 500
    """Missed notifications to replay: the dropped stream buffers them (and the answer) within
    SseConfig.max_buffered_events (1,000)."""
    # 6. Scale-out on Redis: ours with the in-memory store vs ours with redis_url (stock for context).
    redis_rounds: int = 3
    redis_events: tuple[tuple[int, int], ...] = ((200, 30000), (16384, 4000))
    redis_full_rounds: int = 3
    redis_ping_seconds: float = 1.0
    redis_resume_rounds: int = 5
    takeover_rounds: int = 3
    takeover_lease: float = 1.0
    takeover_interval: float = 0.01
    takeover_warm_events: int = 20

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            rounds=3,
            events=((64, 10000), (200, 10000), (1024, 10000), (16384, 1500), (262144, 150)),
            full_rounds=3,
            full_notifications=2000,
            stall_rounds=1,
            stall_cap=4.0,
            baseline_seconds=1.5,
            idle_rounds=1,
            idle_step=250,
            resume_rounds=2,
            redis_rounds=2,
            redis_events=((200, 5000), (16384, 1000)),
            redis_full_rounds=2,
            redis_ping_seconds=0.5,
            redis_resume_rounds=2,
            takeover_rounds=1,
            stream_stall_window=4.0,
        )

    def n_events(self, size: int) -> int:
        return dict(self.events)[size]


def order(round_no: int) -> tuple[str, ...]:
    """Alternate which transport goes first, so neither always runs on a warmer machine."""
    return IMPLS if round_no % 2 == 0 else IMPLS[::-1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread_of(runs: list[dict[str, Any]], key: str, scale: float = 1.0) -> dict[str, float | None]:
    """Median, min and max of ``key`` (times ``scale``) over the runs that have it."""
    values = [r[key] * scale for r in runs if r.get(key) is not None]
    return {"median": median(values), "min": min(values) if values else None, "max": max(values) if values else None}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]: the smallest value with at least q% of the
    values at or below it."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def start_pair(logdir: Path, section: str, ours_args: list[str] | None = None) -> dict[str, ServerProc]:
    procs = {
        impl: ServerProc(impl, (ours_args or []) if impl == "ours" else [], logdir / f"{section}-{impl}.log")
        for impl in IMPLS
    }
    try:
        for proc in procs.values():
            await proc.start()
    except BaseException:
        for proc in procs.values():
            proc.kill()
        raise
    return procs


async def stop_all(procs: dict[str, ServerProc]) -> None:
    await asyncio.gather(*(proc.stop() for proc in procs.values()))


# -- 1. transport alone ----------------------------------------------------------------------


async def bench_transport(plan: Plan, logdir: Path) -> dict[str, Any]:
    procs = await start_pair(logdir, "transport")
    runs: list[dict[str, Any]] = []
    try:
        for impl in IMPLS:  # warm-up, discarded: imports, first allocations, JIT-less but cold caches
            await push_run(procs[impl].port, 2000, 200, 60)
        for round_no in range(plan.rounds):
            for size in plan.sizes:
                n = plan.n_events(size)
                for impl in order(round_no):
                    proc = procs[impl]
                    await asyncio.sleep(plan.settle)
                    cpu0 = proc.cpu_seconds()
                    result = await push_run(proc.port, n, size, time_limit=120)
                    result["server_cpu_s"] = proc.cpu_seconds() - cpu0
                    runs.append({"impl": impl, "size": size, "round": round_no, **result})
                    log(
                        f"transport  round {round_no + 1}/{plan.rounds}  {size:>6} B  {impl:5}  "
                        f"{result['events_per_s']:>9,.0f} events/s"
                    )
    finally:
        await stop_all(procs)
    return {"runs": runs, "summary": summarize_transport(runs, plan)}


def summarize_transport(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for size in plan.sizes:
        row: dict[str, Any] = {"events": plan.n_events(size)}
        for impl in IMPLS:
            mine = [r for r in runs if r["impl"] == impl and r["size"] == size]
            row[impl] = {
                "events_per_s": median([r["events_per_s"] for r in mine]),
                "min": min(r["events_per_s"] for r in mine),
                "max": max(r["events_per_s"] for r in mine),
                # server CPU per event; the SSE clock time (on 2 cores) hides how busy the server was
                "server_cpu_us_per_event": median([r["server_cpu_s"] / r["events"] * 1e6 for r in mine]),
                # response bytes per event: SSE fields (ours adds an id: line) and HTTP chunk framing
                "wire_bytes_per_event": median([r["wire_bytes"] / r["events"] for r in mine]),
            }
        row["ratio"] = row["ours"]["events_per_s"] / row["stock"]["events_per_s"]
        summary[str(size)] = row
    return summary


# -- 2. full stack -----------------------------------------------------------------------------


async def bench_fullstack(plan: Plan, logdir: Path) -> dict[str, Any]:
    procs = await start_pair(logdir, "fullstack")
    runs: list[dict[str, Any]] = []
    try:
        for round_no in range(plan.full_rounds):
            for impl in order(round_no):
                proc = procs[impl]
                await asyncio.sleep(plan.settle)
                async with sdk_client(proc.port) as client:
                    await call_progress(client, 200, time_limit=60)  # warm-up call, discarded
                    cpu0 = proc.cpu_seconds()
                    result = await call_progress(client, plan.full_notifications, time_limit=120)
                    result["server_cpu_s"] = proc.cpu_seconds() - cpu0
                runs.append({"impl": impl, "round": round_no, **result})
                log(
                    f"fullstack  round {round_no + 1}/{plan.full_rounds}  {impl:5}  "
                    f"{result['notifications_per_s']:>9,.0f} notifications/s"
                )
    finally:
        await stop_all(procs)
    return {"runs": runs, "summary": summarize_fullstack(runs, plan)}


def summarize_fullstack(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {"notifications": plan.full_notifications}
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        summary[impl] = {
            "notifications_per_s": median([r["notifications_per_s"] for r in mine]),
            "min": min(r["notifications_per_s"] for r in mine),
            "max": max(r["notifications_per_s"] for r in mine),
            "server_cpu_us_per_notification": median([r["server_cpu_s"] / r["notifications"] * 1e6 for r in mine]),
        }
    summary["ratio"] = summary["ours"]["notifications_per_s"] / summary["stock"]["notifications_per_s"]
    return summary


# -- 3. stalled client -------------------------------------------------------------------------


async def _stall_once(plan: Plan, proc: ServerProc, round_no: int) -> dict[str, Any]:
    pinger = await RawMcpSession.open(proc.port)
    stalled: RawSession | None = None
    samples: list[tuple[float, int]] = []  # (seconds since the stalled session opened, RSS KiB)
    t_open: float | None = None

    async def sample_rss() -> None:
        # /proc only: no request to the server, so the sampler costs the server nothing, and it
        # runs through the baseline too, so both ping windows see the same client-side work.
        for _ in range(20_000):  # 1,000 s at most; cancelled long before
            if t_open is not None:
                samples.append((time.perf_counter() - t_open, proc.rss_kib()))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss())
    try:
        await pinger.ping_for(0.3)  # warm-up
        baseline = await pinger.ping_for(plan.baseline_seconds)
        await asyncio.sleep(plan.settle)
        gc.collect()
        rss0 = proc.rss_kib()
        tag = uuid.uuid4().hex
        target = f"/flood?tag={tag}&size={plan.stall_payload}&cap={plan.stall_cap}"
        # The stalled client: a tiny receive window, reads the endpoint event, then nothing.
        stalled = await RawSession.open(proc.port, target, 10, rcvbuf=4096)
        t_open = time.perf_counter()
        # Meanwhile: the other session's round trips, for as long as the grant timeout (the window
        # in which our producer is stalled; stock's stays stalled for good).
        starts: list[float] = []
        during = await pinger.ping_for(plan.grant_timeout, starts=starts)
        # Then wait for the release (the server timestamps it itself) or the cap; after a release,
        # keep sampling 1 s more (is the memory given back?).
        stats: dict[str, Any] = {}
        released_at: float | None = None
        for _ in range(10_000):  # bounded by the cap below anyway
            now = time.perf_counter() - t_open
            stats = await http_get_json(proc.port, f"/stats?tag={tag}", 5)
            if stats.get("released") is not None and released_at is None:
                released_at = now
            if (released_at is not None and now > released_at + 1.0) or now > plan.stall_cap + 0.5:
                break
            await asyncio.sleep(0.1)
    finally:
        sampler.cancel()
        if stalled is not None:
            stalled.close()
        pinger.close()
    if not samples:
        samples.append((0.0, rss0))

    released = stats.get("released") is not None and stats.get("error") != "TimeoutError"
    peak = max(rss for _, rss in samples)
    # Plateau check over the observation window (until 1 s after a release, or the cap):
    # bounded memory stops growing; compare the window's two halves.
    half = samples[-1][0] / 2
    mid = [rss for t, rss in samples if t <= half]
    late = [rss for t, rss in samples if t > half]
    return {
        "impl": proc.impl,
        "round": round_no,
        "released": released,
        "error": stats.get("error"),
        "released_after_open_s": stats.get("released") if released else None,
        # how long the send that finally failed had been waiting: compare with grant_timeout
        "release_send_wait_s": stats.get("release_send_wait") if released else None,
        "events_sent": stats.get("sent"),
        "last_ok_s": stats.get("last_ok"),
        "cap_s": plan.stall_cap,
        "rss_before_kib": rss0,
        "rss_peak_growth_kib": peak - rss0,
        "rss_end_growth_kib": samples[-1][1] - rss0,
        "rss_growth_first_half_kib": (max(mid) - rss0) if mid else None,
        "rss_growth_second_half_kib": (max(late) - rss0) if late else None,
        "rss_samples": samples,
        "baseline_ms": baseline,
        "during_ms": during,
        "during_start_s": [t - t_open for t in starts],
    }


async def bench_stalled(plan: Plan, logdir: Path) -> dict[str, Any]:
    ours_args = ["--grant-timeout", str(plan.grant_timeout), "--write-timeout", str(plan.write_timeout)]
    runs: list[dict[str, Any]] = []
    for round_no in range(plan.stall_rounds):
        for impl in order(round_no):
            # A fresh server per run, so RSS growth is not hidden by memory a previous run freed.
            procs = {impl: ServerProc(impl, ours_args if impl == "ours" else [], logdir / f"stalled-{impl}.log")}
            await procs[impl].start()
            try:
                result = await _stall_once(plan, procs[impl], round_no)
            finally:
                await stop_all(procs)
            runs.append(result)
            rel = (
                f"released after {result['release_send_wait_s']:.2f} s wait ({result['error']})"
                if result["released"]
                else f"not released within {plan.stall_cap:g} s"
            )
            log(
                f"stalled    round {round_no + 1}/{plan.stall_rounds}  {impl:5}  {rel}; "
                f"RSS +{result['rss_peak_growth_kib'] / 1024:.1f} MiB peak; p99 "
                f"{percentile(result['baseline_ms'], 99):.2f} -> {percentile(result['during_ms'], 99):.2f} ms"
            )
    return {"runs": runs, "summary": summarize_stalled(runs, plan)}


def summarize_stalled(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "grant_timeout_s": plan.grant_timeout,
        "write_timeout_s": plan.write_timeout,
        "cap_s": plan.stall_cap,
        "payload_bytes": plan.stall_payload,
    }
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        waits = [r["release_send_wait_s"] for r in mine if r["released"]]
        summary[impl] = {
            "released_runs": len(waits),
            "runs": len(mine),
            "errors": sorted({r["error"] for r in mine if r["released"] and r["error"]}),
            "release_send_wait_s": median(waits),
            "release_send_wait_max_s": max(waits) if waits else None,
            "released_after_open_s": median([r["released_after_open_s"] for r in mine if r["released"]]),
            "events_sent": median([r["events_sent"] for r in mine]),
            "rss_peak_growth_kib": median([r["rss_peak_growth_kib"] for r in mine]),
            "rss_end_growth_kib": median([r["rss_end_growth_kib"] for r in mine]),
            "rss_growth_second_half_kib": median(
                [r["rss_growth_second_half_kib"] for r in mine if r["rss_growth_second_half_kib"] is not None]
            ),
            "rss_growth_first_half_kib": median(
                [r["rss_growth_first_half_kib"] for r in mine if r["rss_growth_first_half_kib"] is not None]
            ),
            "baseline_p50_ms": median([percentile(r["baseline_ms"], 50) for r in mine]),
            "baseline_p99_ms": median([percentile(r["baseline_ms"], 99) for r in mine]),
            "during_p50_ms": median([percentile(r["during_ms"], 50) for r in mine]),
            "during_p99_ms": median([percentile(r["during_ms"], 99) for r in mine]),
            "baseline_max_ms": max(max(r["baseline_ms"]) for r in mine),
            "during_max_ms": max(max(r["during_ms"]) for r in mine),
            # when (after the stalled session opened) each round's worst ping started
            "during_max_at_s": [
                r["during_start_s"][r["during_ms"].index(max(r["during_ms"]))] for r in mine if r.get("during_start_s")
            ],
            # all rounds' samples pooled: a p99 from more samples
            "baseline_p99_pooled_ms": percentile([x for r in mine for x in r["baseline_ms"]], 99),
            "during_p99_pooled_ms": percentile([x for r in mine for x in r["during_ms"]], 99),
            "baseline_p999_pooled_ms": percentile([x for r in mine for x in r["baseline_ms"]], 99.9),
            "during_p999_pooled_ms": percentile([x for r in mine for x in r["during_ms"]], 99.9),
            "pings_baseline": sum(len(r["baseline_ms"]) for r in mine),
            "pings_during": sum(len(r["during_ms"]) for r in mine),
        }
        s = summary[impl]
        # each round's p99 against its own baseline, then the median over rounds
        s["p99_during_over_baseline"] = median(
            [percentile(r["during_ms"], 99) / percentile(r["baseline_ms"], 99) for r in mine]
        )
        s["p99_pooled_during_over_baseline"] = s["during_p99_pooled_ms"] / s["baseline_p99_pooled_ms"]
    return summary


# -- 4. idle sessions --------------------------------------------------------------------------

IDLE_VARIANTS = {
    "mcp": "/sse",  # a lowlevel Server.run per session, waiting for its client (what a deployment holds)
    "transport": "/idle",  # connect_sse alone: the endpoint just holds the streams open
}
FLOOR_PATH = "/floor"  # no transport: a bare streaming response, the uvicorn + h11 per-connection floor


async def _idle_once(plan: Plan, proc: ServerProc, path: str, round_no: int, variant: str) -> dict[str, Any]:
    sessions: list[RawSession] = []
    try:
        warm = await open_many(proc.port, path, 20, 20, 10)  # warm-up: first-session allocations
        for s in warm:
            s.close()
        await asyncio.sleep(1.0)
        rss0 = proc.rss_kib()
        curve = [(0, rss0)]
        while len(sessions) < plan.idle_sessions:
            step = min(plan.idle_step, plan.idle_sessions - len(sessions))
            sessions += await open_many(proc.port, path, step, 50, 30)
            await asyncio.sleep(0.3)
            curve.append((len(sessions), proc.rss_kib()))
        await asyncio.sleep(1.0)
        rss_n = proc.rss_kib()
        curve[-1] = (len(sessions), rss_n)
    finally:
        for s in sessions:
            s.close()
    return {
        "impl": proc.impl,
        "variant": variant,
        "round": round_no,
        "sessions": len(sessions),
        "rss_before_kib": rss0,
        "rss_after_kib": rss_n,
        "kib_per_session": (rss_n - rss0) / len(sessions),
        "curve": curve,
    }


async def bench_idle(plan: Plan, logdir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for round_no in range(plan.idle_rounds):
        for variant, path in IDLE_VARIANTS.items():
            for impl in order(round_no):
                proc = ServerProc(impl, [], logdir / f"idle-{impl}.log")
                await proc.start()
                try:
                    result = await _idle_once(plan, proc, path, round_no, variant)
                finally:
                    await proc.stop()
                runs.append(result)
                log(
                    f"idle       round {round_no + 1}/{plan.idle_rounds}  {variant:9}  {impl:5}  "
                    f"{result['kib_per_session']:.1f} KiB/session ({result['sessions']} sessions)"
                )
                await asyncio.sleep(plan.settle)
        # The reference floor, once per round, in a server of the impl whose turn it is first.
        impl = order(round_no)[0]
        proc = ServerProc(impl, [], logdir / f"idle-floor-{impl}.log")
        await proc.start()
        try:
            result = await _idle_once(plan, proc, FLOOR_PATH, round_no, "floor")
        finally:
            await proc.stop()
        runs.append(result)
        log(
            f"idle       round {round_no + 1}/{plan.idle_rounds}  floor      (no transport)  "
            f"{result['kib_per_session']:.1f} KiB/connection ({result['sessions']} connections)"
        )
    return {"runs": runs, "summary": summarize_idle(runs, plan)}


def summarize_idle(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {"sessions": plan.idle_sessions}
    floor = [r for r in runs if r["variant"] == "floor"]
    summary["floor"] = {
        "kib_per_session": median([r["kib_per_session"] for r in floor]),
        "curve": [
            (n, median([r["curve"][i][1] - r["rss_before_kib"] for r in floor]))
            for i, (n, _) in enumerate(floor[0]["curve"])
        ],
    }
    for variant in IDLE_VARIANTS:
        row: dict[str, Any] = {}
        for impl in IMPLS:
            mine = [r for r in runs if r["impl"] == impl and r["variant"] == variant]
            steps = [n for n, _ in mine[0]["curve"]]
            row[impl] = {
                "kib_per_session": median([r["kib_per_session"] for r in mine]),
                "min": min(r["kib_per_session"] for r in mine),
                "max": max(r["kib_per_session"] for r in mine),
                "rss_before_kib": median([r["rss_before_kib"] for r in mine]),
                # median RSS growth over the rounds at each step, for the plot
                "curve": [
                    (n, median([r["curve"][i][1] - r["rss_before_kib"] for r in mine])) for i, n in enumerate(steps)
                ],
            }
        row["ratio"] = row["ours"]["kib_per_session"] / row["stock"]["kib_per_session"]
        summary[variant] = row
    return summary


# -- 5. resumption -----------------------------------------------------------------------------

MAX_BUFFERED_EVENTS = 1000  # SseConfig's default, which the bench server keeps


def _session_id(endpoint: str) -> str:
    return endpoint.rpartition("session_id=")[2]


def _token_key(token: str) -> tuple[int, ...]:
    """A store token as numbers, for ordering: ``7`` (in-memory store) or ``1700000000000-3``
    (a Redis stream id)."""
    return tuple(int(part) for part in token.split("-"))


def check_replayed_ids(ids: Sequence[str | None], last_id: str, n: int) -> None:
    """The ``n`` ids after ``last_id``, in order: for the in-memory store's sequence numbers
    exactly ``last + 1 .. last + n``; for Redis stream ids (not consecutive) strictly increasing
    from after ``last_id``, each of the same session."""
    prefix, _, token = last_id.rpartition(":")
    if token.isdigit():
        expected = [f"{prefix}:{int(token) + k}" for k in range(1, n + 1)]
        ok = list(ids) == expected
    else:
        keys = [_token_key(str(i).rpartition(":")[2]) for i in ids if i and i.rpartition(":")[0] == prefix]
        ok = len(ids) == n == len(keys) and all(a < b for a, b in zip([_token_key(token), *keys], keys, strict=False))
    if not ok:
        raise RuntimeError(
            f"replay mismatch: {len(ids)} message events (expected {n}), first {ids[:1]}, last {ids[-1:]}, "
            f"after {last_id}"
        )


async def _resume_cycle(
    proc: ServerProc, n: int, size: int, time_limit: float = 30, resume_on: ServerProc | None = None
) -> dict[str, Any]:
    """Open a session, read its first event and drop; once the server noticed, it pushes ``n``
    events into the detached session; then resume from the first event's id and time the replay.
    ``resume_on``: resume on that server instead (another worker of the same Redis cluster)."""
    tag = uuid.uuid4().hex
    target = f"/replay?tag={tag}&n={n}&size={size}"
    first = await read_first_message(proc.port, target, time_limit)
    last_id = first["message"].get("id")
    if last_id is None:
        raise RuntimeError(f"{proc.label}: the first event has no id: {first['message']}")
    session_id = _session_id(first["endpoint"])
    rss0 = proc.rss_kib()
    go = await http_get_json(proc.port, f"/replay/go?tag={tag}&session={session_id}", time_limit + 5)
    if go.get("error") or go.get("sent") != n:
        raise RuntimeError(f"{proc.label}: the producer did not push {n} events into the detached session: {go}")
    rss_held = proc.rss_kib()  # the go answer came after the last send: nothing more to wait for
    resumer = resume_on or proc
    cpu0, resumer_cpu0 = proc.cpu_seconds(), resumer.cpu_seconds()
    result = await resume_run(resumer.port, target, last_id, n, time_limit)
    cpu = proc.cpu_seconds() - cpu0
    resumer_cpu = resumer.cpu_seconds() - resumer_cpu0 if resumer is not proc else 0.0
    await asyncio.sleep(0.2)
    rss_after = proc.rss_kib()

    # Exactly once, in order, right after the id the client saw, behind the same endpoint event.
    events = result.pop("events")
    ids = [e.get("id") for e in events if e.get("event") == "message"]
    kinds = [e.get("event") for e in events]
    if kinds[:1] != ["endpoint"] or events[0].get("data") != first["endpoint"]:
        raise RuntimeError(f"the resumed stream does not start with the same endpoint event: {events[:1]}")
    if set(kinds) != {"endpoint", "message"}:
        raise RuntimeError(f"unexpected events in the resumed stream: kinds {sorted({str(k) for k in kinds})}")
    check_replayed_ids(ids, last_id, n)
    return {
        **result,
        "events": n,
        "payload_bytes": size,
        "events_per_s": n / result["all_s"],
        "server_cpu_s": cpu + resumer_cpu,
        "produce_s": go["produce_s"],
        "detach_wait_s": go["detach_wait_s"],
        "rss_before_kib": rss0,
        "rss_held_growth_kib": rss_held - rss0,
        "rss_after_replay_growth_kib": rss_after - rss0,
    }


async def _stock_probe(plan: Plan, logdir: Path) -> dict[str, Any]:
    """What stock offers a reconnecting client: its events carry no id, and a GET with a
    Last-Event-ID (the session's, made up, since stock sends none) opens a new session."""
    proc = ServerProc("stock", [], logdir / "resume-stock.log")
    await proc.start()
    try:
        first = await read_first_message(proc.port, f"/replay?tag={uuid.uuid4().hex}&n=0&size=200&wait=5", 10)
        old = _session_id(first["endpoint"])
        again = await RawSession.open(proc.port, "/idle", 10, headers={"Last-Event-ID": f"{old}:1"})
        again.close()
    finally:
        await proc.stop()
    return {
        "impl": "stock",
        "probe": True,
        "event_has_id": "id" in first["message"],
        "reconnect_same_session": _session_id(again.endpoint) == old,
    }


async def bench_resume(plan: Plan, logdir: Path) -> dict[str, Any]:
    if plan.resume_events > MAX_BUFFERED_EVENTS:
        raise ValueError(f"resume_events must be <= {MAX_BUFFERED_EVENTS} (the session buffer's default)")
    runs: list[dict[str, Any]] = []
    probe = await _stock_probe(plan, logdir)
    runs.append(probe)
    log(
        f"resume     stock  events carry an id: {'yes' if probe['event_has_id'] else 'no'}; a reconnect with "
        f"Last-Event-ID gets {'the same' if probe['reconnect_same_session'] else 'a new'} session: no resumption"
    )
    for round_no in range(plan.resume_rounds):
        # A fresh server per round, so the RSS growth is not hidden by memory an earlier round freed.
        proc = ServerProc("ours", [], logdir / "resume-ours.log")
        await proc.start()
        try:
            await _resume_cycle(proc, plan.resume_warmup_events, plan.resume_payload)  # warm-up, discarded
            await asyncio.sleep(plan.settle)
            result = await _resume_cycle(proc, plan.resume_events, plan.resume_payload)
        finally:
            await proc.stop()
        runs.append({"impl": "ours", "round": round_no, **result})
        log(
            f"resume     round {round_no + 1}/{plan.resume_rounds}  ours   first replayed event after "
            f"{result['first_s'] * 1000:.2f} ms, all {result['events']:,} after {result['all_s'] * 1000:.1f} ms "
            f"({result['events_per_s']:,.0f} events/s); RSS +{result['rss_held_growth_kib']:,} KiB held"
        )
    return {"runs": runs, "summary": summarize_resume(runs, plan)}


def summarize_resume(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    ours = [r for r in runs if r["impl"] == "ours"]
    probe = next((r for r in runs if r["impl"] == "stock"), None)

    def spread(key: str, scale: float = 1.0) -> dict[str, float | None]:
        return spread_of(ours, key, scale)

    return {
        "events": plan.resume_events,
        "payload_bytes": plan.resume_payload,
        "rounds": len(ours),
        "ours": {
            "first_event_ms": spread("first_s", 1000),
            "all_events_ms": spread("all_s", 1000),
            "first_to_all_ms": median([(r["all_s"] - r["first_s"]) * 1000 for r in ours]),
            "events_per_s": spread("events_per_s"),
            "head_ms": spread("head_s", 1000),
            "server_cpu_us_per_event": median([r["server_cpu_s"] / r["events"] * 1e6 for r in ours]),
            "wire_bytes": median([r["wire_bytes"] for r in ours]),
            "produce_ms": median([r["produce_s"] * 1000 for r in ours]),
            "detach_wait_ms": median([r["detach_wait_s"] * 1000 for r in ours]),
            "rss_held_growth_kib": spread("rss_held_growth_kib"),
            "rss_after_replay_growth_kib": median([r["rss_after_replay_growth_kib"] for r in ours]),
        },
        "stock": None
        if probe is None
        else {"event_has_id": probe["event_has_id"], "reconnect_same_session": probe["reconnect_same_session"]},
    }


# -- 6. scale-out on Redis -----------------------------------------------------------------------

REDIS_IMPLS = ("stock", "memory", "redis")
"""Transport alone and full stack: stock; ours with the in-memory store; ours with ``redis_url``."""
PING_VARIANTS = ("memory", "redis-owner", "redis-forwarded")
"""Stream and POSTs on one in-memory server; on one Redis worker; stream on A, POSTs to B."""
RESUME_VARIANTS = ("memory", "redis-owner", "redis-other")
"""Resume on the in-memory server; on Redis worker A (the owner); on worker B (replay + relay)."""


def rotate(round_no: int, names: tuple[str, ...]) -> tuple[str, ...]:
    """Rotate which variant goes first from round to round (``order`` for more than two)."""
    k = round_no % len(names)
    return names[k:] + names[:k]


def redis_available() -> str | None:
    """Why the Redis scenario cannot run here (no ``redis-server``, no redis-py), or ``None``."""
    import importlib.util
    import shutil

    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "redis-py is not installed (pip install -e '.[redis]')"
    return None


def _redis_args(redis: RedisProc, prefix: str, owner_lease: float | None = None) -> list[str]:
    args = ["--redis-url", redis.url, "--redis-prefix", prefix]
    return args if owner_lease is None else [*args, "--owner-lease", f"{owner_lease:g}"]


async def _redis_transport(
    plan: Plan, procs: dict[str, ServerProc], redis: RedisProc, runs: list[dict[str, Any]]
) -> None:
    for impl in REDIS_IMPLS:  # warm-up, discarded
        await push_run(procs[impl].port, 1000, 200, 60)
    for round_no in range(plan.redis_rounds):
        for size, n in plan.redis_events:
            for impl in rotate(round_no, REDIS_IMPLS):
                proc = procs[impl]
                await asyncio.sleep(plan.settle)
                cpu0, redis_cpu0 = proc.cpu_seconds(), redis.cpu_seconds()
                result = await push_run(proc.port, n, size, time_limit=180)
                result["server_cpu_s"] = proc.cpu_seconds() - cpu0
                result["redis_cpu_s"] = redis.cpu_seconds() - redis_cpu0
                runs.append({"kind": "transport", "impl": impl, "size": size, "round": round_no, **result})
                log(
                    f"redis      transport round {round_no + 1}/{plan.redis_rounds}  {size:>6} B  {impl:6}  "
                    f"{result['events_per_s']:>9,.0f} events/s"
                )


async def _redis_fullstack(
    plan: Plan, procs: dict[str, ServerProc], redis: RedisProc, runs: list[dict[str, Any]]
) -> None:
    for round_no in range(plan.redis_full_rounds):
        for impl in rotate(round_no, REDIS_IMPLS):
            proc = procs[impl]
            await asyncio.sleep(plan.settle)
            async with sdk_client(proc.port) as client:
                await call_progress(client, 200, time_limit=60)  # warm-up call, discarded
                cpu0, redis_cpu0 = proc.cpu_seconds(), redis.cpu_seconds()
                result = await call_progress(client, plan.full_notifications, time_limit=180)
                result["server_cpu_s"] = proc.cpu_seconds() - cpu0
                result["redis_cpu_s"] = redis.cpu_seconds() - redis_cpu0
            runs.append({"kind": "fullstack", "impl": impl, "round": round_no, **result})
            log(
                f"redis      fullstack round {round_no + 1}/{plan.redis_full_rounds}  {impl:6}  "
                f"{result['notifications_per_s']:>9,.0f} notifications/s"
            )


async def _redis_pings(plan: Plan, procs: dict[str, ServerProc], runs: list[dict[str, Any]]) -> None:
    ends = {
        "memory": (procs["memory"], procs["memory"]),
        "redis-owner": (procs["redis"], procs["redis"]),
        "redis-forwarded": (procs["redis"], procs["redis-b"]),
    }
    for round_no in range(plan.redis_rounds):
        for variant in rotate(round_no, PING_VARIANTS):
            stream_on, post_to = ends[variant]
            await asyncio.sleep(plan.settle)
            session = await RawMcpSession.open(stream_on.port, post_port=post_to.port)
            try:
                await session.ping_for(0.2)  # warm-up
                rtts = await session.ping_for(plan.redis_ping_seconds)
            finally:
                session.close()
            runs.append({"kind": "ping", "variant": variant, "round": round_no, "rtts_ms": rtts})
            log(
                f"redis      ping      round {round_no + 1}/{plan.redis_rounds}  {variant:15}  "
                f"p50 {percentile(rtts, 50):.2f} ms, p99 {percentile(rtts, 99):.2f} ms ({len(rtts):,} pings)"
            )


async def _redis_resume(plan: Plan, procs: dict[str, ServerProc], runs: list[dict[str, Any]]) -> None:
    ends = {
        "memory": (procs["memory"], None),
        "redis-owner": (procs["redis"], None),
        "redis-other": (procs["redis"], procs["redis-b"]),
    }
    for owner, resume_on in ends.values():  # warm-up, discarded
        await _resume_cycle(owner, plan.resume_warmup_events, plan.resume_payload, resume_on=resume_on)
    for round_no in range(plan.redis_resume_rounds):
        for variant in rotate(round_no, RESUME_VARIANTS):
            owner, resume_on = ends[variant]
            await asyncio.sleep(plan.settle)
            result = await _resume_cycle(owner, plan.resume_events, plan.resume_payload, resume_on=resume_on)
            runs.append({"kind": "resume", "variant": variant, "round": round_no, **result})
            log(
                f"redis      resume    round {round_no + 1}/{plan.redis_resume_rounds}  {variant:11}  first "
                f"replayed event after {result['first_s'] * 1000:.2f} ms, all {result['events']:,} after "
                f"{result['all_s'] * 1000:.1f} ms"
            )


async def _wait_response(stream: SseStream, request_id: int, time_limit: float) -> tuple[float, dict[str, Any]]:
    """Read ``stream`` until the JSON-RPC response (or error) to ``request_id``: when it arrived,
    and the message."""
    import json

    deadline = time.perf_counter() + time_limit
    while True:
        item = await stream.next_event(max(0.001, deadline - time.perf_counter()))
        if item is None:
            raise ConnectionError(f"the stream ended before the response to request {request_id}")
        at, event = item
        if event.get("event") != "message":
            continue
        message = json.loads(event["data"])
        if message.get("id") == request_id and ("result" in message or "error" in message):
            return at, message


async def _takeover_once(plan: Plan, redis: RedisProc, logdir: Path, round_no: int) -> dict[str, Any]:
    """Two fresh workers with a short owner lease; an initialized session on A with a tool call
    streaming progress; SIGKILL A; the client resumes on B at once with the last id it saw and
    reads until the call's error (``REQUEST_INTERRUPTED``, sent by B once it took the session
    over), then pings through B."""
    import json

    from redis.asyncio import Redis

    prefix = f"bench-takeover-{uuid.uuid4().hex[:8]}:"
    args = _redis_args(redis, prefix, plan.takeover_lease)
    a = ServerProc("ours", args, logdir / "redis-takeover-a.log", "ours-redis-a")
    b = ServerProc("ours", args, logdir / "redis-takeover-b.log", "ours-redis-b")
    client: Redis = Redis.from_url(redis.url)
    streams: list[SseStream] = []
    limit = 10.0
    try:
        await a.start()
        await b.start()
        stream = await SseStream.open(a.port, "/sse", limit)
        streams.append(stream)
        first = await stream.next_event(limit)
        if first is None or first[1].get("event") != "endpoint":
            raise RuntimeError(f"no endpoint event from worker A: {first}")
        endpoint = first[1]["data"]
        session_id = _session_id(endpoint)

        async def post(port: int, message: dict[str, Any]) -> None:
            status = await post_json(port, endpoint, message, limit)
            if status != 202:
                raise RuntimeError(f"POST {message.get('method')} to :{port} answered {status}")

        info = {"name": "bench", "version": "0"}
        init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": info}
        await post(a.port, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
        await _wait_response(stream, 1, limit)
        await post(a.port, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        arguments = {"count": 1_000_000, "interval": plan.takeover_interval}
        call = {"name": "progress", "arguments": arguments, "_meta": {"progressToken": "takeover"}}
        await post(a.port, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        progress = 0
        while progress < plan.takeover_warm_events:
            item = await stream.next_event(limit)
            if item is None:
                raise ConnectionError("worker A's stream ended during the tool call")
            if "notifications/progress" in item[1].get("data", ""):
                progress += 1

        pttl = int(await client.pttl(f"{prefix}{{{session_id}}}:owner"))  # the directory's lease key
        lease_left = pttl / 1000 if pttl >= 0 else None
        t_kill = time.perf_counter()
        a.kill()  # SIGKILL, to worker A's PID
        received_after_kill = 0
        while await stream.next_event(limit) is not None:  # what A had sent before it died
            received_after_kill += 1
        t_eof = time.perf_counter()
        last_id = stream.last_id
        if last_id is None:
            raise RuntimeError("no event id seen on worker A's stream")
        stream.close()

        t_connect = time.perf_counter()
        resumed = await SseStream.open(b.port, "/sse", limit, headers={"Last-Event-ID": last_id})
        streams.append(resumed)
        head = await resumed.next_event(limit)
        if head is None or head[1].get("event") != "endpoint" or head[1].get("data") != endpoint:
            raise RuntimeError(f"the resumed stream does not start with the session's endpoint event: {head}")
        t_endpoint = head[0]
        # Replayed events (A stored them, the client never got them), then B's answer to the call.
        replayed: list[str] = []
        deadline = time.perf_counter() + plan.takeover_lease + 3 + limit
        t_continued: float | None = None
        error: dict[str, Any] = {}
        while t_continued is None:
            item = await resumed.next_event(max(0.001, deadline - time.perf_counter()))
            if item is None:
                raise ConnectionError("the resumed stream on worker B ended before the call was answered")
            at, event = item
            if event.get("event") != "message":
                raise RuntimeError(f"unexpected event on the resumed stream: {event}")
            message = json.loads(event["data"])
            if message.get("id") == 2:
                t_continued, error = at, message.get("error") or {}
            else:
                replayed.append(event.get("id", ""))
        check_replayed_ids(replayed, last_id, len(replayed))
        t_ping = time.perf_counter()
        await post(b.port, {"jsonrpc": "2.0", "id": 3, "method": "ping"})
        t_pong, _ = await _wait_response(resumed, 3, limit)
        return {
            "kind": "takeover",
            "round": round_no,
            "owner_lease_s": plan.takeover_lease,
            "lease_left_s": lease_left,
            "progress_before_kill": progress,
            "received_after_kill": received_after_kill,
            "eof_s": t_eof - t_kill,
            "reconnect_after_kill_s": t_connect - t_kill,
            "endpoint_s": t_endpoint - t_kill,
            "replayed": len(replayed),
            "continued_s": t_continued - t_kill,
            "continued_after_connect_s": t_continued - t_connect,
            "interrupted_code": error.get("code"),
            "interrupted_message": error.get("message"),
            "ping_after_ms": (t_pong - t_ping) * 1000,
        }
    finally:
        for s in streams:
            s.close()
        await client.aclose()
        a.kill()
        await b.stop()


async def bench_redis(plan: Plan, logdir: Path) -> dict[str, Any]:
    """Scale-out on Redis: one redis-server of the suite's own, workers as bench servers."""
    missing = redis_available()
    if missing is not None:
        raise RuntimeError(f"the redis section needs Redis: {missing}")
    redis = RedisProc(logdir / "redis-server.log")
    redis.start()
    runs: list[dict[str, Any]] = []
    info: dict[str, Any] = {"redis_version": redis.version, "takeover_lease_s": plan.takeover_lease}
    log(f"redis      redis-server {redis.version} on 127.0.0.1:{redis.port} (pid {redis.pid})")
    try:
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        specs = {
            "stock": ("stock", []),
            "memory": ("ours", []),
            "redis": ("ours", _redis_args(redis, prefix)),
            "redis-b": ("ours", _redis_args(redis, prefix)),
        }
        procs: dict[str, ServerProc] = {}
        try:
            for name, (impl, args) in specs.items():
                proc = ServerProc(impl, args, logdir / f"redis-{name}.log", name)
                procs[name] = proc
                await proc.start()
            await _redis_transport(plan, procs, redis, runs)
            await _redis_fullstack(plan, procs, redis, runs)
            await _redis_pings(plan, procs, runs)
            await _redis_resume(plan, procs, runs)
        finally:
            await asyncio.gather(*(proc.stop() for proc in procs.values()))
        for round_no in range(plan.takeover_rounds):
            result = await _takeover_once(plan, redis, logdir, round_no)
            runs.append(result)
            left = result["lease_left_s"]
            log(
                f"redis      takeover  round {round_no + 1}/{plan.takeover_rounds}  owner_lease "
                f"{plan.takeover_lease:g} s ({'?' if left is None else f'{left * 1000:.0f} ms'} left at the kill): "
                f"stream on B continued {result['continued_s'] * 1000:.0f} ms after SIGKILL "
                f"({result['replayed']} replayed first)"
            )
    finally:
        redis.stop()
    return {"info": info, "runs": runs, "summary": summarize_redis(runs, plan)}


def summarize_redis(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float | None]:
        return {
            "median": median(values),
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }

    summary: dict[str, Any] = {}
    transport: dict[str, Any] = {}
    for size, n in plan.redis_events:
        row: dict[str, Any] = {"events": n}
        for impl in REDIS_IMPLS:
            mine = [r for r in runs if r.get("kind") == "transport" and r["impl"] == impl and r["size"] == size]
            if not mine:
                break
            row[impl] = {
                "events_per_s": spread([r["events_per_s"] for r in mine]),
                "server_cpu_us_per_event": median([r["server_cpu_s"] / r["events"] * 1e6 for r in mine]),
                "redis_cpu_us_per_event": median([r["redis_cpu_s"] / r["events"] * 1e6 for r in mine]),
            }
        else:
            eps = {impl: row[impl]["events_per_s"]["median"] for impl in REDIS_IMPLS}
            row["redis_over_memory"] = eps["redis"] / eps["memory"]
            row["redis_over_stock"] = eps["redis"] / eps["stock"]
            row["memory_over_stock"] = eps["memory"] / eps["stock"]
            transport[str(size)] = row
    if transport:
        summary["transport"] = transport

    full = [r for r in runs if r.get("kind") == "fullstack"]
    if full:
        fs: dict[str, Any] = {"notifications": plan.full_notifications}
        for impl in REDIS_IMPLS:
            mine = [r for r in full if r["impl"] == impl]
            fs[impl] = {
                "notifications_per_s": spread([r["notifications_per_s"] for r in mine]),
                "server_cpu_us_per_notification": median([r["server_cpu_s"] / r["notifications"] * 1e6 for r in mine]),
                "redis_cpu_us_per_notification": median([r["redis_cpu_s"] / r["notifications"] * 1e6 for r in mine]),
            }
        nps = {impl: fs[impl]["notifications_per_s"]["median"] for impl in REDIS_IMPLS}
        fs["redis_over_memory"] = nps["redis"] / nps["memory"]
        fs["redis_over_stock"] = nps["redis"] / nps["stock"]
        summary["fullstack"] = fs

    pings = [r for r in runs if r.get("kind") == "ping"]
    if pings:
        ping: dict[str, Any] = {"seconds": plan.redis_ping_seconds}
        for variant in PING_VARIANTS:
            pooled = [rtt for r in pings if r["variant"] == variant for rtt in r["rtts_ms"]]
            ping[variant] = {
                "p50_ms": percentile(pooled, 50),
                "p99_ms": percentile(pooled, 99),
                "pings": len(pooled),
            }
        summary["ping"] = ping

    resumes = [r for r in runs if r.get("kind") == "resume"]
    if resumes:
        resume: dict[str, Any] = {"events": plan.resume_events, "payload_bytes": plan.resume_payload}
        for variant in RESUME_VARIANTS:
            mine = [r for r in resumes if r["variant"] == variant]
            resume[variant] = {
                "rounds": len(mine),
                "head_ms": spread([r["head_s"] * 1000 for r in mine]),
                "first_event_ms": spread([r["first_s"] * 1000 for r in mine]),
                "all_events_ms": spread([r["all_s"] * 1000 for r in mine]),
                "events_per_s": spread([r["events_per_s"] for r in mine]),
                "server_cpu_us_per_event": median([r["server_cpu_s"] / r["events"] * 1e6 for r in mine]),
                "produce_ms": median([r["produce_s"] * 1000 for r in mine]),
            }
        summary["resume"] = resume

    takeovers = [r for r in runs if r.get("kind") == "takeover"]
    if takeovers:
        left = [r["lease_left_s"] * 1000 for r in takeovers if r["lease_left_s"] is not None]
        summary["takeover"] = {
            "rounds": len(takeovers),
            "owner_lease_s": takeovers[0]["owner_lease_s"],
            "interval_s": plan.takeover_interval,
            "continued_ms": spread([r["continued_s"] * 1000 for r in takeovers]),
            "lease_left_ms": spread(left),
            "beyond_lease_ms": median(
                [(r["continued_s"] - r["lease_left_s"]) * 1000 for r in takeovers if r["lease_left_s"] is not None]
            ),
            "eof_ms": median([r["eof_s"] * 1000 for r in takeovers]),
            "endpoint_ms": spread([r["endpoint_s"] * 1000 for r in takeovers]),
            "replayed": median([r["replayed"] for r in takeovers]),
            "ping_after_ms": median([r["ping_after_ms"] for r in takeovers]),
            "interrupted_codes": sorted({str(r["interrupted_code"]) for r in takeovers}),
        }
    return summary


SUMMARIZERS = {
    "transport": summarize_transport,
    "fullstack": summarize_fullstack,
    "stalled": summarize_stalled,
    "idle": summarize_idle,
    "resume": summarize_resume,
    "redis": summarize_redis,
}


def plan_from_json(saved: dict[str, Any]) -> Plan:
    """The Plan a results file was made with (JSON turned its tuples into lists)."""
    fields: dict[str, Any] = dict(saved)
    fields["sizes"] = tuple(fields["sizes"])
    fields["events"] = tuple((int(size), int(n)) for size, n in fields["events"])
    if "redis_events" in fields:
        fields["redis_events"] = tuple((int(size), int(n)) for size, n in fields["redis_events"])
    return Plan(**fields)


def resummarize(results: dict[str, Any]) -> None:
    """Recompute every section's summary from its raw runs (after a change to the statistics)."""
    from .streamable import SUMMARIZERS as STREAMABLE_SUMMARIZERS

    plan = plan_from_json(results["plan"])
    for name, summarize in {**SUMMARIZERS, **STREAMABLE_SUMMARIZERS}.items():
        if name in results and results[name].get("runs"):
            results[name]["summary"] = summarize(results[name]["runs"], plan)
