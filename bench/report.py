"""Results to text: the console table, the targets, docs/benchmarks.md and its plots."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .procs import REPO

DOCS = REPO / "docs"
PLOT_THROUGHPUT = "benchmarks-throughput.png"
PLOT_IDLE = "benchmarks-idle-memory.png"
PLOT_STALLED = "benchmarks-stalled-rss.png"
PLOT_REDIS = "benchmarks-redis.png"
PACKAGES = (
    "mcp",
    "mcp-types",
    "mcp-sse-transport",
    "uvicorn",
    "h11",
    "starlette",
    "sse-starlette",
    "anyio",
    "pydantic",
    "redis",
    "hiredis",
)


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = len(os.sched_getaffinity(0))
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    commit = None
    try:  # read-only
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "mcp_sse_transport"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if dirty:
            commit += " (mcp_sse_transport/ has uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "nproc": nproc,
        "cpu_model": cpu,
        "mem_total_kib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": versions,
        "commit": commit,
    }


# -- targets ---------------------------------------------------------------------------------


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each measured, with met/not met (None when not measured)."""
    out: list[dict[str, Any]] = []
    transport = results.get("transport", {}).get("summary")
    if transport:
        row = transport.get("200")
        if row:
            out.append(
                {
                    "target": "Transport alone, 200 B: ours >= 6x stock events/s",
                    "measured": (
                        f"{row['ratio']:.2f}x ({row['ours']['events_per_s']:,.0f} vs "
                        f"{row['stock']['events_per_s']:,.0f} events/s)"
                    ),
                    "met": row["ratio"] >= 6,
                }
            )
        worst_size, worst = min(((s, r) for s, r in transport.items()), key=lambda kv: kv[1]["ratio"])
        out.append(
            {
                "target": "Transport alone: never slower than stock at any size (medians)",
                "measured": f"lowest ratio {worst['ratio']:.2f}x at {_size(int(worst_size))}",
                "met": worst["ratio"] >= 1.0,
            }
        )
    stalled = results.get("stalled", {}).get("summary")
    if stalled:
        ours = stalled["ours"]
        growth_after = (ours["rss_growth_second_half_kib"] or 0) - (ours["rss_growth_first_half_kib"] or 0)
        bounded = ours["released_runs"] == ours["runs"] and growth_after <= 256
        out.append(
            {
                "target": "Stalled client: server memory bounded",
                "measured": (
                    f"ours +{ours['rss_peak_growth_kib'] / 1024:.1f} MiB peak, no growth after the stall filled the "
                    f"buffer (second half of the window {growth_after:+d} KiB vs first); session released in "
                    f"{ours['released_runs']}/{ours['runs']} runs "
                    f"(stock +{stalled['stock']['rss_peak_growth_kib'] / 1024:.1f} MiB, "
                    "held by TCP backpressure, never released)"
                ),
                "met": bounded,
            }
        )
        limit = stalled["grant_timeout_s"] * 1.1
        worst_wait = ours["release_send_wait_max_s"]
        out.append(
            {
                "target": f"Stalled client: producer released within grant timeout + 10% (<= {limit:.2f} s)",
                "measured": (
                    f"ours: blocked send released after {worst_wait:.3f} s (worst of {ours['runs']}), "
                    f"{ours['released_after_open_s']:.2f} s after the session opened; "
                    f"stock: not released within {stalled['cap_s']:g} s"
                    if worst_wait is not None
                    else "ours: not released"
                ),
                "met": worst_wait is not None and ours["released_runs"] == ours["runs"] and worst_wait <= limit,
            }
        )
        ratio = ours["p99_pooled_during_over_baseline"]
        out.append(
            {
                "target": "Stalled client: other session's p99 within 1.2x of its baseline (ours; pooled samples)",
                "measured": (
                    f"{ratio:.2f}x ({ours['baseline_p99_pooled_ms']:.2f} -> {ours['during_p99_pooled_ms']:.2f} ms; "
                    f"per round, median {ours['p99_during_over_baseline']:.2f}x; "
                    f"stock {stalled['stock']['p99_pooled_during_over_baseline']:.2f}x). Worst single ping while "
                    f"stalled: ours {ours['during_max_ms']:.1f} ms, stock {stalled['stock']['during_max_ms']:.1f} ms"
                ),
                "met": ratio <= 1.2,
            }
        )
    idle = results.get("idle", {}).get("summary")
    if idle:
        for variant, label in (("mcp", "with a lowlevel Server per session"), ("transport", "transport alone")):
            row = idle[variant]
            out.append(
                {
                    "target": f"Idle sessions ({label}): memory per session <= 0.5x stock",
                    "measured": (
                        f"{row['ratio']:.2f}x ({row['ours']['kib_per_session']:.1f} vs "
                        f"{row['stock']['kib_per_session']:.1f} KiB/session)"
                    ),
                    "met": row["ratio"] <= 0.5,
                }
            )
    resume = results.get("resume", {}).get("summary")
    if resume:
        ours = resume["ours"]
        out.append(
            {
                "target": "Resumption (no numeric target; reported)",
                "measured": (
                    f"ours: first of {resume['events']:,} replayed events "
                    f"{ours['first_event_ms']['median']:.2f} ms after reconnecting, all after "
                    f"{ours['all_events_ms']['median']:.2f} ms ({ours['events_per_s']['median']:,.0f} events/s), "
                    f"server RSS +{ours['rss_held_growth_kib']['median']:,.0f} KiB while the missed events were held; "
                    f"stock: {_stock_resume(resume)}"
                ),
                "met": None,
            }
        )
    redis = results.get("redis", {}).get("summary")
    if redis and redis.get("transport") and redis.get("resume"):
        size = "200" if "200" in redis["transport"] else next(iter(redis["transport"]))
        row = redis["transport"][size]
        resume = redis["resume"]
        takeover = redis.get("takeover")
        out.append(
            {
                "target": "Scale-out on Redis (no numeric target; reported)",
                "measured": (
                    f"transport alone, {_size(int(size))}: "
                    f"Redis store {row['redis']['events_per_s']['median']:,.0f} events/s, "
                    f"{row['redis_over_memory']:.2f}x the in-memory store, {row['redis_over_stock']:.2f}x stock; "
                    f"resume of {resume['events']:,} missed events on another worker: first after "
                    f"{resume['redis-other']['first_event_ms']['median']:.1f} ms, all after "
                    f"{resume['redis-other']['all_events_ms']['median']:.1f} ms (in memory, one process: "
                    f"{resume['memory']['first_event_ms']['median']:.1f} / "
                    f"{resume['memory']['all_events_ms']['median']:.1f} ms)"
                    + (
                        f"; takeover after SIGKILL with owner_lease {takeover['owner_lease_s']:g} s: stream went on "
                        f"after {takeover['continued_ms']['median']:,.0f} ms"
                        if takeover
                        else ""
                    )
                ),
                "met": None,
            }
        )
    return out


def _stock_probe(resume: dict[str, Any]) -> str | None:
    """What the run found stock does for a reconnecting client."""
    probe = resume.get("stock")
    if not probe:
        return None
    ids = "its events carry an id" if probe["event_has_id"] else "its events carry no id"
    session = "the same session" if probe["reconnect_same_session"] else "a new session"
    return f"{ids}; a GET with Last-Event-ID opens {session}"


def _stock_resume(resume: dict[str, Any]) -> str:
    probe = _stock_probe(resume)
    return "no resumption" + (f" ({probe})" if probe else "")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def _p99_change(s: dict[str, Any]) -> str:
    return (
        f"{s['baseline_p99_pooled_ms']:.2f} → {s['during_p99_pooled_ms']:.2f} ms "
        f"({s['p99_pooled_during_over_baseline']:.2f}x)"
    )


def _resumption_status() -> str:
    try:
        import mcp_sse_transport
    except ImportError:
        return "n/a"
    return (
        "implemented (not measured in this run)"
        if hasattr(mcp_sse_transport, "InMemoryEventStore")
        else "not implemented"
    )


# -- tables ----------------------------------------------------------------------------------


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def results_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, stock, ours, ours/stock) rows of the main table."""
    rows: list[tuple[str, str, str, str]] = []
    transport = results.get("transport", {}).get("summary")
    if transport:
        for size, row in transport.items():
            rows.append(
                (
                    f"1. Transport alone, {_size(int(size))} events (events/s)",
                    _num(row["stock"]["events_per_s"]),
                    _num(row["ours"]["events_per_s"]),
                    f"{row['ratio']:.2f}x",
                )
            )
        for size, row in transport.items():
            rows.append(
                (
                    f"1. Transport alone, {_size(int(size))}: server CPU per event (µs)",
                    _num(row["stock"]["server_cpu_us_per_event"], 1),
                    _num(row["ours"]["server_cpu_us_per_event"], 1),
                    f"{row['ours']['server_cpu_us_per_event'] / row['stock']['server_cpu_us_per_event']:.2f}x",
                )
            )
    full = results.get("fullstack", {}).get("summary")
    if full:
        rows.append(
            (
                f"2. Full stack: {full['notifications']:,} progress notifications in one tool call (notifications/s)",
                _num(full["stock"]["notifications_per_s"]),
                _num(full["ours"]["notifications_per_s"]),
                f"{full['ratio']:.2f}x",
            )
        )
        rows.append(
            (
                "2. Full stack: server CPU per notification (µs)",
                _num(full["stock"]["server_cpu_us_per_notification"], 1),
                _num(full["ours"]["server_cpu_us_per_notification"], 1),
                _ratio(full["ours"]["server_cpu_us_per_notification"], full["stock"]["server_cpu_us_per_notification"]),
            )
        )
    stalled = results.get("stalled", {}).get("summary")
    if stalled:
        st, ou = stalled["stock"], stalled["ours"]

        def released(s: dict[str, Any]) -> str:
            if not s["released_runs"]:
                return f"not released within {stalled['cap_s']:g} s"
            return f"{s['release_send_wait_s']:.2f} s ({s['released_runs']}/{s['runs']} runs)"

        rows.append(
            (
                f"3. Stalled client: producer released after (grant_timeout {stalled['grant_timeout_s']:g} s)",
                released(st),
                released(ou),
                "",
            )
        )
        rows.append(
            (
                "3. Stalled client: events accepted before the producer blocked for good",
                _num(st["events_sent"]),
                _num(ou["events_sent"]),
                "",
            )
        )
        rows.append(
            (
                "3. Stalled client: server RSS growth, peak (MiB)",
                _num(st["rss_peak_growth_kib"] / 1024, 1),
                _num(ou["rss_peak_growth_kib"] / 1024, 1),
                f"{ou['rss_peak_growth_kib'] / st['rss_peak_growth_kib']:.2f}x"
                if st["rss_peak_growth_kib"] > 0
                else "",
            )
        )
        for key, label in (
            ("baseline_p50_ms", "p50, no stalled client"),
            ("during_p50_ms", "p50, stalled client"),
            ("baseline_p99_pooled_ms", "p99, no stalled client"),
            ("during_p99_pooled_ms", "p99, stalled client"),
        ):
            rows.append(
                (
                    f"3. Other session's ping round trip, {label} (ms)",
                    _num(st[key], 2),
                    _num(ou[key], 2),
                    f"{ou[key] / st[key]:.2f}x",
                )
            )
        rows.append(
            (
                "3. Other session's worst ping, stalled client (ms)",
                _num(st["during_max_ms"], 1),
                _num(ou["during_max_ms"], 1),
                f"{ou['during_max_ms'] / st['during_max_ms']:.2f}x",
            )
        )
        rows.append(
            (
                "3. Other session's p99, stalled / no stalled client",
                f"{st['p99_pooled_during_over_baseline']:.2f}x",
                f"{ou['p99_pooled_during_over_baseline']:.2f}x",
                "",
            )
        )
    idle = results.get("idle", {}).get("summary")
    if idle:
        for variant, label in (("mcp", "lowlevel Server per session"), ("transport", "transport alone")):
            row = idle[variant]
            rows.append(
                (
                    f"4. Idle sessions ({idle['sessions']:,}), {label}: server RSS per session (KiB)",
                    _num(row["stock"]["kib_per_session"], 1),
                    _num(row["ours"]["kib_per_session"], 1),
                    f"{row['ratio']:.2f}x",
                )
            )
        rows.append(
            (
                "4. Reference: bare streaming connection, no transport (KiB/connection)",
                _num(idle["floor"]["kib_per_session"], 1),
                "(same)",
                "",
            )
        )
    resume = results.get("resume", {}).get("summary")
    if resume:
        ours = resume["ours"]
        n = f"{resume['events']:,}"
        stock_none = "none (no event ids)" if resume.get("stock") and not resume["stock"]["event_has_id"] else "none"
        rows += [
            (
                f"5. Resumption, {n} missed {_size(resume['payload_bytes'])} events: reconnect to first replayed "
                "event (ms)",
                stock_none,
                _num(ours["first_event_ms"]["median"], 2),
                "",
            ),
            (
                f"5. Resumption: reconnect to all {n} replayed events (ms)",
                "—",
                _num(ours["all_events_ms"]["median"], 2),
                "",
            ),
            (
                "5. Resumption: replay throughput, reconnect to last event (events/s)",
                "—",
                _num(ours["events_per_s"]["median"]),
                "",
            ),
            (
                f"5. Resumption: server RSS growth holding the {n} missed events (KiB)",
                "—",
                _num(ours["rss_held_growth_kib"]["median"]),
                "",
            ),
        ]
    else:
        rows.append(("5. Resumption (Last-Event-ID replay)", "none", _resumption_status(), ""))
    return rows + streamable_rows(results)


def _ping_cell(p: dict[str, Any], key: str, digits: int = 2) -> str:
    return _num(p[key], digits) if p.get(key) is not None else "none answered"


def _stock_streamable_probe(resume: dict[str, Any]) -> str | None:
    probe = resume.get("stock")
    if not probe:
        return None
    ids = "its events carry no id" if not probe["event_has_id"] else "its events carry an id"
    return f"{ids}; a GET with Last-Event-ID is answered {probe['resume_status']}"


def _stock_streamable_resume(resume: dict[str, Any]) -> str:
    probe = resume.get("stock")
    if not probe:
        return "none"
    return f"none ({'ids' if probe['event_has_id'] else 'no event ids'}; a resume GET gets {probe['resume_status']})"


def streamable_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, stock, ours, ours/stock) rows of the Streamable HTTP sections (7-10)."""
    rows: list[tuple[str, str, str, str]] = []
    full = results.get("streamable", {}).get("summary")
    if full:
        for client, label in (("sdk", "SDK client"), ("raw", "raw client counting events")):
            row = full.get(client)
            if row:
                rows.append(
                    (
                        f"7. Streamable HTTP: {full['notifications']:,} progress notifications on a POST's response "
                        f"stream, {label} (notifications/s)",
                        _num(row["stock"]["notifications_per_s"]),
                        _num(row["ours"]["notifications_per_s"]),
                        f"{row['ratio']:.2f}x",
                    )
                )
        raw = full.get("raw")
        if raw:
            rows.append(
                (
                    "7. Streamable HTTP: server CPU per notification, raw client (µs)",
                    _num(raw["stock"]["server_cpu_us_per_notification"], 1),
                    _num(raw["ours"]["server_cpu_us_per_notification"], 1),
                    _ratio(
                        raw["ours"]["server_cpu_us_per_notification"], raw["stock"]["server_cpu_us_per_notification"]
                    ),
                )
            )
    stalled = results.get("stalled-streamable", {}).get("summary")
    if stalled and "stock" in stalled and "ours" in stalled:
        st, ou = stalled["stock"], stalled["ours"]

        def released(s: dict[str, Any]) -> str:
            if not s["released_runs"]:
                if s["blocked_s"] is not None and s["blocked_s"] < 0.05:
                    return "never blocked (its sends returned; those past the cut were dropped)"
                blocked = "" if s["blocked_s"] is None else f", blocked {s['blocked_s']:.1f} s"
                return f"not released (to the tool's cap{blocked})"
            return f"{s['release_send_wait_s']:.2f} s ({s['released_runs']}/{s['runs']} runs)"

        def answered(s: dict[str, Any]) -> str:
            d = s["during"]
            return f"{d['answered']}/{d['pings']} ({d['timeouts']} timeouts)"

        rows += [
            (
                f"8. Streamable stalled response stream: producer released after (grant_timeout "
                f"{stalled['grant_timeout_s']:g} s)",
                released(st),
                released(ou),
                "",
            ),
            (
                f"8. Streamable stalled stream: same session's pings answered within {stalled['ping_timeout_s']:g} s",
                answered(st),
                answered(ou),
                "",
            ),
        ]
        for phase, key, label in (
            ("baseline", "p50_ms", "p50, no stalled stream"),
            ("during", "p50_ms", "p50, stalled stream"),
            ("baseline", "p99_ms", "p99, no stalled stream"),
            ("during", "p99_ms", "p99, stalled stream"),
            ("during", "max_ms", "worst, stalled stream"),
        ):
            a, b = st[phase].get(key), ou[phase].get(key)
            rows.append(
                (
                    f"8. Streamable stalled stream: same session's ping round trip, {label} (ms; answered pings)",
                    _ping_cell(st[phase], key),
                    _ping_cell(ou[phase], key),
                    f"{b / a:.2f}x" if a and b else "",
                )
            )
        rows += [
            (
                "8. Streamable stalled stream: SLOW_CONSUMER error event seen / the call's answer",
                f"{st['slow_consumer_event_runs']}/{st['runs']} / {', '.join(st['call_answers'])}",
                f"{ou['slow_consumer_event_runs']}/{ou['runs']} / {', '.join(ou['call_answers'])}",
                "",
            ),
            (
                "8. Streamable stalled stream: server RSS growth, peak (MiB)",
                _num(st["rss_peak_growth_kib"] / 1024, 1),
                _num(ou["rss_peak_growth_kib"] / 1024, 1),
                _ratio(ou["rss_peak_growth_kib"], st["rss_peak_growth_kib"]) if st["rss_peak_growth_kib"] > 0 else "",
            ),
        ]
    idle = results.get("idle-streamable", {}).get("summary")
    if idle and "ratio" in idle:
        rows.append(
            (
                f"9. Streamable idle sessions ({idle['sessions']:,}, each with its GET stream): server RSS per "
                "session (KiB)",
                _num(idle["stock"]["kib_per_session"], 1),
                _num(idle["ours"]["kib_per_session"], 1),
                f"{idle['ratio']:.2f}x",
            )
        )
    resume = results.get("resume-streamable", {}).get("summary")
    if resume and resume.get("ours"):
        ours = resume["ours"]
        n = f"{resume['events']:,}"
        rows += [
            (
                f"10. Streamable resume, {n} missed {_size(resume['payload_bytes'])} notifications: reconnect to "
                "first replayed event (ms)",
                _stock_streamable_resume(resume),
                _num(ours["first_event_ms"]["median"], 2),
                "",
            ),
            (
                f"10. Streamable resume: reconnect to all {n} and the answer (ms)",
                "—",
                _num(ours["all_events_ms"]["median"], 2),
                "",
            ),
            ("10. Streamable resume: replay throughput (events/s)", "—", _num(ours["events_per_s"]["median"]), ""),
            (
                f"10. Streamable resume: server RSS growth holding the {n} missed events (KiB)",
                "—",
                _num(ours["rss_held_growth_kib"]["median"]),
                "",
            ),
        ]
    return rows


def _ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def redis_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, ours in-memory, ours on Redis, Redis/memory) rows of the scale-out summary."""
    redis = results.get("redis", {}).get("summary")
    if not redis:
        return []
    rows: list[tuple[str, str, str, str]] = []
    for size, row in redis.get("transport", {}).items():
        rows.append(
            (
                f"6. Transport alone, {_size(int(size))} events (events/s; "
                f"stock {_num(row['stock']['events_per_s']['median'])})",
                _num(row["memory"]["events_per_s"]["median"]),
                _num(row["redis"]["events_per_s"]["median"]),
                f"{row['redis_over_memory']:.2f}x",
            )
        )
    full = redis.get("fullstack")
    if full:
        rows.append(
            (
                f"6. Full stack, {full['notifications']:,} progress notifications (notifications/s; stock "
                f"{_num(full['stock']['notifications_per_s']['median'])})",
                _num(full["memory"]["notifications_per_s"]["median"]),
                _num(full["redis"]["notifications_per_s"]["median"]),
                f"{full['redis_over_memory']:.2f}x",
            )
        )
    ping = redis.get("ping")
    if ping:
        for variant, label in (("redis-owner", "to the owner"), ("redis-forwarded", "to another worker")):
            rows.append(
                (
                    f"6. Ping round trip p50, POST {label} (ms)",
                    _ms(ping["memory"]["p50_ms"], 2),
                    _ms(ping[variant]["p50_ms"], 2),
                    _ratio(ping[variant]["p50_ms"], ping["memory"]["p50_ms"]),
                )
            )
    resume = redis.get("resume")
    if resume:
        n = f"{resume['events']:,}"
        for variant, label in (("redis-owner", "on the owner"), ("redis-other", "on another worker")):
            for key, what in (("first_event_ms", "first replayed event"), ("all_events_ms", f"all {n}")):
                rows.append(
                    (
                        f"6. Resume {label}, {n} missed events: reconnect to {what} (ms)",
                        _ms(resume["memory"][key]["median"], 2),
                        _ms(resume[variant][key]["median"], 2),
                        _ratio(resume[variant][key]["median"], resume["memory"][key]["median"]),
                    )
                )
    takeover = redis.get("takeover")
    if takeover:
        rows.append(
            (
                f"6. Takeover: SIGKILL of the owner to the stream going on elsewhere "
                f"(owner_lease {takeover['owner_lease_s']:g} s) (ms)",
                "none (no scale-out)",
                _ms(takeover["continued_ms"]["median"], 0),
                "",
            )
        )
    return rows


def console_table(results: dict[str, Any]) -> str:
    rows = [("Measurement", "stock", "ours", "ours/stock"), *results_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            out.append(line)
    redis = redis_rows(results)
    if redis:
        rows2 = [("Scale-out on Redis (ours)", "in-memory store", "Redis", "Redis/memory"), *redis]
        widths = [max(len(r[i]) for r in rows2) for i in range(4)]
        out.append("")
        for i, row in enumerate(rows2):
            out.append(
                "  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row))
            )
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append("Targets:")
    for t in evaluate_targets(results):
        verdict = "no target" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        out.append(f"  [{verdict:7}] {t['target']}: {t['measured']}")
    return "\n".join(out)


def _md_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], *, numeric: bool = True) -> str:
    align = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------


def make_plots(results: dict[str, Any], docs: Path = DOCS) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    colors = {"stock": "tab:gray", "ours": "tab:blue"}
    transport = results.get("transport", {}).get("summary")
    if transport:
        sizes = [int(s) for s in transport]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for impl in ("stock", "ours"):
            med = [transport[str(s)][impl]["events_per_s"] for s in sizes]
            lo = [m - transport[str(s)][impl]["min"] for s, m in zip(sizes, med, strict=True)]
            hi = [transport[str(s)][impl]["max"] - m for s, m in zip(sizes, med, strict=True)]
            ax.errorbar(
                sizes, med, yerr=[lo, hi], marker="o", capsize=3, color=colors[impl], label=f"{impl} (median, min-max)"
            )
        for s in sizes:
            ax.annotate(
                f"{transport[str(s)]['ratio']:.1f}x",
                (s, transport[str(s)]["ours"]["events_per_s"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                color=colors["ours"],
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        top = max(transport[str(s)][impl]["max"] for s in sizes for impl in ("stock", "ours"))
        ax.set_ylim(top=top * 2.5)
        ax.set_xticks(sizes, [_size(s) for s in sizes])
        ax.set_xlabel("event payload (serialized JSON-RPC message)")
        ax.set_ylabel("events/s (one session, loopback)")
        ax.set_title("Transport alone: events/s vs event size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(docs / PLOT_THROUGHPUT, dpi=110)
        plt.close(fig)
        made.append(PLOT_THROUGHPUT)
    idle = results.get("idle", {}).get("summary")
    if idle:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        styles = {"mcp": "-", "transport": "--"}
        labels = {"mcp": "lowlevel Server per session", "transport": "transport alone"}
        for variant in ("mcp", "transport"):
            for impl in ("stock", "ours"):
                curve = idle[variant][impl]["curve"]
                ax.plot(
                    [n for n, _ in curve],
                    [kib / 1024 for _, kib in curve],
                    styles[variant],
                    marker=".",
                    color=colors[impl],
                    label=f"{impl}, {labels[variant]}",
                )
        floor = idle["floor"]["curve"]
        ax.plot(
            [n for n, _ in floor],
            [kib / 1024 for _, kib in floor],
            ":",
            color="tab:green",
            label="bare streaming connection (no transport)",
        )
        ax.set_xlabel("open idle sessions")
        ax.set_ylabel("server RSS growth (MiB)")
        ax.set_title("Idle sessions: server memory vs open sessions")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / PLOT_IDLE, dpi=110)
        plt.close(fig)
        made.append(PLOT_IDLE)
    stalled = results.get("stalled", {})
    if stalled.get("runs"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for impl in ("stock", "ours"):
            run = next(r for r in stalled["runs"] if r["impl"] == impl)
            ax.plot(
                [t for t, _ in run["rss_samples"]],
                [(kib - run["rss_before_kib"]) / 1024 for _, kib in run["rss_samples"]],
                color=colors[impl],
                label=impl,
            )
            if run["released"]:
                ax.axvline(run["released_after_open_s"], color=colors[impl], ls=":", lw=1)
                ax.annotate(
                    "producer released",
                    (run["released_after_open_s"], 0),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=colors[impl],
                )
        ax.set_xlabel("seconds since the stalled client's session opened")
        ax.set_ylabel("server RSS growth (MiB)")
        ax.set_title(
            f"Stalled client (grant_timeout {stalled['summary']['grant_timeout_s']:g} s), first round", fontsize=11
        )
        ax.annotate(
            "freed memory stays in the process (allocator), reused by later sessions",
            (0.99, 0.5),
            xycoords="axes fraction",
            ha="right",
            fontsize=7,
            color="dimgray",
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / PLOT_STALLED, dpi=110)
        plt.close(fig)
        made.append(PLOT_STALLED)
    redis = results.get("redis", {}).get("summary")
    if redis and redis.get("transport") and redis.get("resume"):
        _plot_redis(plt, redis, docs / PLOT_REDIS)
        made.append(PLOT_REDIS)
    return made


def _plot_redis(plt: Any, redis: dict[str, Any], path: Path) -> None:
    """Left: events/s, stock / ours in memory / ours on Redis, by scenario. Right: resume times."""
    colors = {"stock": "tab:gray", "memory": "tab:blue", "redis": "tab:red"}
    labels = {"stock": "stock", "memory": "ours, in-memory store", "redis": "ours, Redis store"}
    groups: list[tuple[str, dict[str, Any]]] = [
        (f"transport alone\n{_size(int(size))}", {impl: row[impl]["events_per_s"] for impl in colors})
        for size, row in redis["transport"].items()
    ]
    if redis.get("fullstack"):
        full = redis["fullstack"]
        groups.append(("full stack\n(notifications)", {impl: full[impl]["notifications_per_s"] for impl in colors}))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    width = 0.27
    for k, impl in enumerate(colors):
        xs = [i + (k - 1) * width for i in range(len(groups))]
        med = [g[impl]["median"] for _, g in groups]
        lo = [m - g[impl]["min"] for m, (_, g) in zip(med, groups, strict=True)]
        hi = [g[impl]["max"] - m for m, (_, g) in zip(med, groups, strict=True)]
        left.bar(xs, med, width, yerr=[lo, hi], capsize=2, color=colors[impl], label=labels[impl])
        for x, m, (_, g) in zip(xs, med, groups, strict=True):
            top = g[impl]["max"]
            left.annotate(f"{m:,.0f}", (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=6)
    left.set_yscale("log")
    left.set_ylim(top=max(g[impl]["max"] for _, g in groups for impl in colors) * 4)
    left.set_xticks(range(len(groups)), [name for name, _ in groups])
    left.set_ylabel("events/s (median, min-max)")
    left.set_title("Throughput: in-memory vs Redis store", fontsize=11)
    left.grid(True, axis="y", which="both", alpha=0.3)
    left.legend(fontsize=8, loc="upper right")

    resume = redis["resume"]
    variants = [
        ("memory", "in memory,\none process"),
        ("redis-owner", "Redis,\non the owner"),
        ("redis-other", "Redis, on\nanother worker"),
    ]
    ys = range(len(variants))
    first = [resume[v]["first_event_ms"]["median"] for v, _ in variants]
    rest = [resume[v]["all_events_ms"]["median"] - f for (v, _), f in zip(variants, first, strict=True)]
    right.barh(ys, first, color="tab:purple", label="reconnect to first replayed event")
    right.barh(ys, rest, left=first, color="tab:orange", label=f"... to all {resume['events']:,}")
    for y, (v, _) in zip(ys, variants, strict=True):
        total = resume[v]["all_events_ms"]["median"]
        right.annotate(f"{total:.1f} ms", (total, y), textcoords="offset points", xytext=(3, -3), fontsize=8)
    right.set_yticks(list(ys), [label for _, label in variants], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("ms (median)")
    right.set_xlim(right=max(resume[v]["all_events_ms"]["median"] for v, _ in variants) * 1.25)
    right.set_title(f"Resume after {resume['events']:,} missed events", fontsize=11)
    right.grid(True, axis="x", alpha=0.3)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- docs/benchmarks.md ----------------------------------------------------------------------


def markdown(results: dict[str, Any], plots: list[str], json_path: str) -> str:
    m = results["machine"]
    plan = results["plan"]
    v = m["versions"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks: stock `SseServerTransport` vs `mcp_sse_transport`\n")
    add(
        "Generated by the benchmark suite in `bench/` (see `bench/README.md`); do not edit by hand, "
        "re-run the suite instead. The stock class is `mcp.server.sse.SseServerTransport`; ours is "
        "`mcp_sse_transport.SseServerTransport`, same constructor, same Starlette app around it.\n"
    )
    add("## Command\n")
    add(f"```\n{results['command']}\n```\n")
    add(
        f"Run {results['started']} - {results['finished']} ({results['wall_seconds']:.0f} s). "
        f"Raw results (every sample): `{json_path}` (gitignored).\n"
    )
    add("## Machine\n")
    mem = f"{m['mem_total_kib'] / 1024 / 1024:.1f} GiB" if m.get("mem_total_kib") else "unknown"
    add(
        _md_table(
            ("", ""),
            [
                ("nproc", str(m["nproc"])),
                ("CPU", m["cpu_model"]),
                ("Memory", mem),
                ("Kernel", m["kernel"]),
                ("Python", f"{m['python']} ({m['python_implementation']})"),
                ("mcp / mcp-types", f"{v.get('mcp')} / {v.get('mcp-types')}"),
                ("uvicorn / h11", f"{v.get('uvicorn')} / {v.get('h11')}"),
                ("starlette / sse-starlette", f"{v.get('starlette')} / {v.get('sse-starlette')}"),
                ("anyio / pydantic", f"{v.get('anyio')} / {v.get('pydantic')}"),
                ("mcp-sse-transport", f"{v.get('mcp-sse-transport')} (commit {m.get('commit')})"),
                *(
                    [
                        (
                            "redis-server / redis-py / hiredis",
                            f"{results['redis'].get('info', {}).get('redis_version')} / {v.get('redis')} / "
                            f"{v.get('hiredis') or 'not installed'}",
                        )
                    ]
                    if "redis" in results
                    else []
                ),
            ],
            numeric=False,
        )
    )
    add("")
    add("## Results\n")
    add(
        "Medians over the rounds (transport alone: "
        f"{plan['rounds']} rounds; full stack: {plan['full_rounds']}; stalled client: {plan['stall_rounds']}; "
        f"idle sessions: {plan['idle_rounds']}"
        + (f"; resumption: {plan['resume_rounds']}" if "resume" in results else "")
        + "). Ratios are ours/stock: above 1 is better for throughput, "
        "below 1 is better for memory, latency and CPU."
        + (" Scale-out on Redis has its own table and section (6)." if "redis" in results else "")
        + "\n"
    )
    add(_md_table(("Measurement", "stock", "ours", "ours/stock"), results_rows(results)))
    add("")
    add("## Targets (from the issue)\n")
    add(
        _md_table(
            ("Target", "Measured", "Met?"),
            [
                (t["target"], t["measured"], "—" if t["met"] is None else "**met**" if t["met"] else "**not met**")
                for t in evaluate_targets(results)
            ],
            numeric=False,
        )
    )
    add("")

    transport = results.get("transport", {}).get("summary")
    if transport:
        add("## 1. Transport alone\n")
        add(
            "A server process per transport; on each `GET /push?n=N&size=S` the endpoint opens `connect_sse` "
            "and sends N `SessionMessage`-wrapped JSON-RPC notifications into its write stream, each "
            "serializing to exactly S bytes (the SSE `data:`), then closes the stream. The client is a raw "
            "asyncio socket protocol that counts `event: message` lines until N arrived; the time is from "
            "writing the request to the N-th event. Same client code, same N, for both.\n"
        )
        rows: list[tuple[str, ...]] = []
        for size, row in transport.items():
            rows.append(
                (
                    _size(int(size)),
                    f"{row['events']:,}",
                    f"{row['stock']['events_per_s']:,.0f} ({row['stock']['min']:,.0f}-{row['stock']['max']:,.0f})",
                    f"{row['ours']['events_per_s']:,.0f} ({row['ours']['min']:,.0f}-{row['ours']['max']:,.0f})",
                    f"{row['ratio']:.2f}x",
                    f"{row['stock']['server_cpu_us_per_event']:,.1f}",
                    f"{row['ours']['server_cpu_us_per_event']:,.1f}",
                    f"{row['stock'].get('wire_bytes_per_event', 0):,.0f}",
                    f"{row['ours'].get('wire_bytes_per_event', 0):,.0f}",
                )
            )
        add(
            _md_table(
                (
                    "payload",
                    "N",
                    "stock events/s (min-max)",
                    "ours events/s (min-max)",
                    "ratio",
                    "stock CPU µs/event",
                    "ours CPU µs/event",
                    "stock wire B/event",
                    "ours wire B/event",
                ),
                rows,
            )
        )
        add("")
        add(
            "CPU is the server process's user + system time over the run divided by N. Wire bytes per event "
            "include the SSE fields and HTTP chunk framing; ours carries an `id:` line on every event (for "
            "resumption), stock none.\n"
        )
        add("")
        if PLOT_THROUGHPUT in plots:
            add(f"![events/s vs event size]({PLOT_THROUGHPUT})\n")

    full = results.get("fullstack", {}).get("summary")
    if full:
        add("## 2. Full stack\n")
        add(
            "An SDK lowlevel `Server` with one tool that sends "
            f"{full['notifications']:,} progress notifications (`send_progress_notification`, related to the "
            'call) and returns; called with `mcp.client.client.Client(sse_client(url), mode="legacy")` and a '
            "`progress_callback` that counts them. Time from the call to its result, after one discarded "
            "warm-up call in the same session. The SDK client and server dominate here; the transport is a "
            "small part of each notification's cost.\n"
        )
        add(
            _md_table(
                ("", "stock", "ours"),
                [
                    (
                        "notifications/s (median)",
                        _num(full["stock"]["notifications_per_s"]),
                        _num(full["ours"]["notifications_per_s"]),
                    ),
                    (
                        "min-max",
                        f"{full['stock']['min']:,.0f}-{full['stock']['max']:,.0f}",
                        f"{full['ours']['min']:,.0f}-{full['ours']['max']:,.0f}",
                    ),
                    (
                        "server CPU µs/notification",
                        _num(full["stock"]["server_cpu_us_per_notification"], 1),
                        _num(full["ours"]["server_cpu_us_per_notification"], 1),
                    ),
                ],
            )
        )
        add("")

    stalled = results.get("stalled", {}).get("summary")
    if stalled:
        st, ou = stalled["stock"], stalled["ours"]
        add("## 3. Stalled client\n")
        add(
            f"A fresh server process per run. Ours runs with `SseConfig(grant_timeout={stalled['grant_timeout_s']:g}, "
            f"write_timeout={stalled['write_timeout_s']:g})`, other settings default (1,000 events / 4 MiB "
            "buffer). One client opens `GET /flood` with a 4 KiB receive buffer, reads the endpoint event and "
            f"stops reading; the endpoint pushes {stalled['payload_bytes']:,} B notifications as fast as "
            "`send()` returns, until it raises or a cap of "
            f'{stalled["cap_s"]:g} s. "Released after" is how long the `send()` that finally raised had been '
            "blocked (compare with the grant timeout). Server RSS is sampled every 50 ms. Meanwhile a second, "
            "initialized MCP session on the same server (raw sockets: a POST per ping on a keep-alive "
            "connection, the response read off its own SSE stream) pings sequentially for "
            f"{stalled['grant_timeout_s']:g} s from the moment the stalled client's session opened; its "
            f"baseline is {plan['baseline_seconds']:g} s of pings just before, with no stalled client. p99s "
            "are over all rounds' samples pooled (the per-round medians are in the JSON).\n"
        )
        add(
            _md_table(
                ("", "stock", "ours"),
                [
                    (
                        "producer released",
                        "no" if not st["released_runs"] else f"{st['released_runs']}/{st['runs']}",
                        f"{ou['released_runs']}/{ou['runs']} runs ({', '.join(ou['errors']) or '—'})",
                    ),
                    (
                        "blocked send released after (median / worst)",
                        "—"
                        if st["release_send_wait_s"] is None
                        else f"{st['release_send_wait_s']:.3f} / {st['release_send_wait_max_s']:.3f} s",
                        "—"
                        if ou["release_send_wait_s"] is None
                        else f"{ou['release_send_wait_s']:.3f} / {ou['release_send_wait_max_s']:.3f} s",
                    ),
                    (
                        "released after session open (median)",
                        "—" if st["released_after_open_s"] is None else f"{st['released_after_open_s']:.2f} s",
                        "—" if ou["released_after_open_s"] is None else f"{ou['released_after_open_s']:.2f} s",
                    ),
                    ("events accepted by `send()`", _num(st["events_sent"]), _num(ou["events_sent"])),
                    (
                        "RSS growth, peak",
                        f"{st['rss_peak_growth_kib'] / 1024:.2f} MiB",
                        f"{ou['rss_peak_growth_kib'] / 1024:.2f} MiB",
                    ),
                    (
                        "RSS growth, end of window",
                        f"{st['rss_end_growth_kib'] / 1024:.2f} MiB",
                        f"{ou['rss_end_growth_kib'] / 1024:.2f} MiB",
                    ),
                    (
                        "other session p50 baseline → stalled",
                        f"{st['baseline_p50_ms']:.2f} → {st['during_p50_ms']:.2f} ms",
                        f"{ou['baseline_p50_ms']:.2f} → {ou['during_p50_ms']:.2f} ms",
                    ),
                    (
                        "other session p99 baseline → stalled (pooled)",
                        _p99_change(st),
                        _p99_change(ou),
                    ),
                    (
                        "other session p99.9 baseline → stalled (pooled)",
                        f"{st['baseline_p999_pooled_ms']:.2f} → {st['during_p999_pooled_ms']:.2f} ms",
                        f"{ou['baseline_p999_pooled_ms']:.2f} → {ou['during_p999_pooled_ms']:.2f} ms",
                    ),
                    (
                        "other session worst ping baseline → stalled",
                        f"{st['baseline_max_ms']:.1f} → {st['during_max_ms']:.1f} ms",
                        f"{ou['baseline_max_ms']:.1f} → {ou['during_max_ms']:.1f} ms",
                    ),
                    (
                        "pings (baseline / stalled)",
                        f"{st['pings_baseline']:,} / {st['pings_during']:,}",
                        f"{ou['pings_baseline']:,} / {ou['pings_during']:,}",
                    ),
                ],
            )
        )
        add("")
        add(
            "Stock's memory stays flat because its zero-size streams hand each event straight to uvicorn, "
            "which stops taking writes once its 64 KiB transport buffer and the kernel's socket buffers are full; "
            "the producer then waits for good (the session, its tasks and any handler writing to it stay "
            "parked until the client goes away). Ours holds up to its configured buffer, cuts the session "
            "loose after the grant timeout (the client gets the `SLOW_CONSUMER` error event if it can still "
            "take it, and the connection is aborted) and the producer gets `SlowConsumerError` "
            "(a `BrokenResourceError`), which the SDK server understands.\n"
        )
        worst_at = ", ".join(f"{t * 1000:.1f} ms" for t in ou.get("during_max_at_s", []))
        if worst_at:
            add(
                f"Ours' worst ping of each round started {worst_at} after the stalled session opened, i.e. while "
                "the producer was filling the session's buffer and the socket.\n"
            )
        if PLOT_STALLED in plots:
            add(f"![RSS during a stalled client]({PLOT_STALLED})\n")

    idle = results.get("idle", {}).get("summary")
    if idle:
        add("## 4. Idle sessions\n")
        add(
            f"A fresh server process per run; {idle['sessions']:,} raw GETs (50 at a time) each read the "
            "response head and the endpoint event, then idle. RSS (`VmRSS` of the server process) is read "
            "before the first (after 20 warm-up sessions were opened and closed) and after each 100; "
            "KiB/session is the growth at the end over the session count. Two server bodies: a lowlevel "
            "`Server.run` per session (what a deployment holds open) and the transport alone (the endpoint "
            "just holds `connect_sse`'s streams). The bare streaming connection (no transport, no MCP: a raw "
            "ASGI response that sends one event and waits for the disconnect) is the floor that uvicorn, h11, "
            "asyncio and Starlette routing cost any implementation.\n"
        )
        idle_rows: list[tuple[str, ...]] = []
        for variant, label in (("mcp", "lowlevel Server per session"), ("transport", "transport alone")):
            row = idle[variant]
            idle_rows.append(
                (
                    label,
                    f"{row['stock']['kib_per_session']:.1f} ({row['stock']['min']:.1f}-{row['stock']['max']:.1f})",
                    f"{row['ours']['kib_per_session']:.1f} ({row['ours']['min']:.1f}-{row['ours']['max']:.1f})",
                    f"{row['ratio']:.2f}x",
                    f"{row['stock']['kib_per_session'] - idle['floor']['kib_per_session']:.1f}",
                    f"{row['ours']['kib_per_session'] - idle['floor']['kib_per_session']:.1f}",
                )
            )
        idle_rows.append(
            ("bare streaming connection (floor)", f"{idle['floor']['kib_per_session']:.1f}", "", "", "", "")
        )
        add(
            _md_table(
                (
                    "server body",
                    "stock KiB/session (min-max)",
                    "ours KiB/session (min-max)",
                    "ratio",
                    "stock above floor",
                    "ours above floor",
                ),
                idle_rows,
            )
        )
        add("")
        if PLOT_IDLE in plots:
            add(f"![memory vs open sessions]({PLOT_IDLE})\n")

    add("## 5. Resumption\n")
    resume = results.get("resume", {}).get("summary")
    if resume:
        add(_resume_markdown(resume))
    else:
        add(
            "Not measured in this run. The stock transport has no resumption (no event ids; a reconnect "
            "silently creates a new session), so there is nothing to compare against. "
            + (
                "Ours implements it (event ids, a per-session replay log, `Last-Event-ID` resume within "
                "`session_grace`); `python -m bench --only resume` measures it. "
                if _resumption_status() != "not implemented"
                else "Ours does not implement it yet either. "
            )
            + "\n"
        )

    add("## 6. Scale-out on Redis\n")
    if results.get("redis", {}).get("summary"):
        add(_redis_markdown(results, plots))
    else:
        add(
            "Not measured in this run. `python -m bench --only redis` measures our transport with "
            "`SseConfig(redis_url=...)` against itself with the in-memory store, on a `redis-server` the suite "
            "starts and stops itself (Debian's `redis-server` package and redis-py are needed).\n"
        )

    add("## 7-10. Streamable HTTP\n")
    if any(results.get(name, {}).get("summary") for name in STREAMABLE_SECTIONS):
        add(_streamable_markdown(results))
    else:
        add(
            "Not measured in this run. `python -m bench --only "
            + ",".join(STREAMABLE_SECTIONS)
            + "` compares the SDK's `StreamableHTTPSessionManager` with ours.\n"
        )

    add("## Method and fairness\n")
    add(
        "\n".join(
            [
                "- One server process per transport (`python -m bench.server --impl stock|ours`), started by the "
                "suite; "
                "each binds 127.0.0.1 port 0 and serves under uvicorn "
                + str(v.get("uvicorn"))
                + " (h11, asyncio loop, "
                "no access log). Memory is that process's `VmRSS` from `/proc/<pid>/status`; CPU is its "
                "CPU-time clock (`clock_getcpuclockid`, all threads).",
                "- Clients run in the suite's own process; all traffic is loopback. Every wait has a timeout and every "
                "loop a count or time bound.",
                "- Rounds alternate which transport goes first. Each measurement keeps every sample in the JSON.",
                "- Stock is wired with the SDK's documented pattern (a Starlette function endpoint calling "
                "`connect_sse(request.scope, request.receive, request._send)` and returning `Response()`); ours with a "
                "raw ASGI endpoint and the library's `H11Protocol` (uvicorn's h11 protocol plus a connection-abort "
                "hook). With stock, the documented `return Response()` raises `RuntimeError: Unexpected ASGI message "
                "'http.response.start' sent, after response already completed` at the end of every session whose "
                "stream completed; uvicorn logs it (server logs are in `bench/results/logs/`). It happens after the "
                "measured events arrived.",
                "- The listening socket is created with `proto=IPPROTO_TCP`. asyncio only sets `TCP_NODELAY` on "
                "sockets whose `proto` says TCP, and accepted sockets inherit the listener's: with "
                "`socket.socket(AF_INET, SOCK_STREAM)` every connection runs with Nagle's algorithm and each 202 "
                "(written as head, then body) waits for the client's delayed ACK, so every round trip took ~44 ms "
                "for both transports.",
                "- To see where our writer spends its time under the transport-alone load: `python -m bench.profile` "
                "(pyinstrument; `--py-spy` for py-spy; `--size`, `--impl stock`), output in `bench/results/`.",
                "- Payload sizes are the serialized JSON-RPC message (the `data:` line); wire bytes per event add the "
                "SSE framing (`event: message`, `data: `, CRLFs; ours also an `id:` line) and HTTP chunk framing.",
                *(
                    [
                        "- Scale-out (6): the suite's own `redis-server`, started on a free loopback port and stopped "
                        "by its PID; workers are bench servers with `--redis-url`, each stopped by its PID (SIGTERM; "
                        "SIGKILL only for the takeover's victim). Its logs are in `bench/results/logs/` too."
                    ]
                    if "redis" in results
                    else []
                ),
            ]
        )
    )
    add("")
    return "\n".join(out)


STREAMABLE_SECTIONS = ("streamable", "stalled-streamable", "idle-streamable", "resume-streamable")


def _streamable_markdown(results: dict[str, Any]) -> str:
    plan = results["plan"]
    out: list[str] = []
    add = out.append
    add(
        "The SDK's `mcp.server.streamable_http_manager.StreamableHTTPSessionManager` against "
        "`mcp_sse_transport.StreamableHTTPSessionManager` (same constructor, plus `config`), each in its own "
        "server process (`python -m bench.server --impl stock|ours --transport streamable`): the manager at "
        "`/mcp` as a raw ASGI endpoint, its `run()` entered for the server's life, serving the same lowlevel "
        "`Server`; no event store, no security settings, for both. The raw clients speak protocol 2025-06-18 "
        "(no priming events), each POST on a connection of its own; rows are in the table above.\n"
    )
    full = results.get("streamable", {}).get("summary")
    if full:
        add("### 7. Notifications/s on a POST's response stream\n")
        add(
            f"The `progress` tool sends {full['notifications']:,} progress notifications related to the call, on "
            "the call's POST response stream. Twice per round and transport: through "
            '`Client(streamable_http_client(url), mode="legacy")` with a `progress_callback` counting them (after '
            "a discarded warm-up call), and through a raw socket that POSTs `tools/call` on an initialized session "
            "and counts `event: message` until the notifications and the answer arrived. Medians over "
            f"{plan['full_rounds']} rounds (min-max).\n"
        )
        rows: list[tuple[str, ...]] = []
        for client, label in (("sdk", "SDK client"), ("raw", "raw client")):
            row = full.get(client)
            if row:
                rows.append(
                    (
                        label,
                        f"{row['stock']['notifications_per_s']:,.0f} ({row['stock']['min']:,.0f}-"
                        f"{row['stock']['max']:,.0f})",
                        f"{row['ours']['notifications_per_s']:,.0f} ({row['ours']['min']:,.0f}-"
                        f"{row['ours']['max']:,.0f})",
                        f"{row['ratio']:.2f}x",
                        _num(row["stock"]["server_cpu_us_per_notification"], 1),
                        _num(row["ours"]["server_cpu_us_per_notification"], 1),
                    )
                )
        add(
            _md_table(
                ("client", "stock notifications/s", "ours notifications/s", "ratio", "stock CPU µs", "ours CPU µs"),
                rows,
            )
        )
        add("")
    stalled = results.get("stalled-streamable", {}).get("summary")
    if stalled and "stock" in stalled and "ours" in stalled:
        add("### 8. A stalled response stream, and the same session's pings\n")
        add(
            "A fresh server per run; ours with `SseConfig(grant_timeout="
            f"{stalled['grant_timeout_s']:g}, write_timeout={stalled['write_timeout_s']:g})`. On one initialized "
            "session, a `tools/call flood` POSTed on a socket with a 4 KiB receive buffer, whose response stream "
            f"the client stops reading after the head, while the tool sends {stalled['payload_bytes']:,} B progress "
            "notifications as fast as `send_progress_notification` returns, for "
            f"{stalled['tool_cap_s']:g} s at most. Meanwhile the same session pings: one POST every "
            f"{stalled['ping_interval_s'] * 1000:g} ms for {stalled['window_s']:g} s, each on its own connection "
            f"and not waiting for the previous one, each given {stalled['ping_timeout_s']:g} s (a ping not answered "
            f"by then is a timeout); the baseline is {plan['baseline_seconds']:g} s of the same just before. "
            "Then the client reads what the stalled stream still delivers (ours: until it ends; stock: 1 s), "
            "looking for the `SLOW_CONSUMER` (-32050) error event and the call's answer. Stock's per-session "
            "message router puts each message into its request's 16-slot stream; once the stalled one is full it "
            "blocks, and with it every other message of the session.\n"
        )
        stall_rows: list[tuple[str, ...]] = []
        for impl in ("stock", "ours"):
            s = stalled[impl]
            b, d = s["baseline"], s["during"]
            stall_rows.append(
                (
                    impl,
                    "no"
                    if not s["released_runs"]
                    else f"after {s['release_send_wait_s']:.2f} s ({s['released_runs']}/{s['runs']})",
                    f"{d['answered']}/{d['pings']} ({d['timeouts']} timeouts, {d['errors']} errors)",
                    f"{_ping_cell(b, 'p50_ms')} / {_ping_cell(b, 'p99_ms')}",
                    f"{_ping_cell(d, 'p50_ms')} / {_ping_cell(d, 'p99_ms')} / {_ping_cell(d, 'max_ms', 1)}",
                    f"{s['slow_consumer_event_runs']}/{s['runs']}",
                    ", ".join(s["call_answers"]),
                    f"{s['rss_peak_growth_kib'] / 1024:.1f}",
                )
            )
        add(
            _md_table(
                (
                    "",
                    "producer released",
                    "pings answered (stalled)",
                    "ping p50 / p99, baseline (ms)",
                    "ping p50 / p99 / worst, stalled (ms)",
                    "SLOW_CONSUMER event",
                    "call answer",
                    "RSS growth peak (MiB)",
                ),
                stall_rows,
                numeric=False,
            )
        )
        add("")
    idle = results.get("idle-streamable", {}).get("summary")
    if idle and "ratio" in idle:
        add("### 9. Idle sessions\n")
        add(
            f"A fresh server per run; {idle['sessions']:,} sessions (50 at a time), each a raw POST `initialize`, a "
            "POST `notifications/initialized` and a GET of its standalone stream, whose head is read and which "
            "then stays open, idle. RSS before (after 20 warm-up sessions) and after each "
            f"{plan['idle_step']}; KiB/session is the growth at the end over the session count.\n"
        )
        add(
            _md_table(
                ("", "stock KiB/session (min-max)", "ours KiB/session (min-max)", "ratio"),
                [
                    (
                        "session + open GET stream",
                        *(
                            f"{idle[i]['kib_per_session']:.1f} ({idle[i]['min']:.1f}-{idle[i]['max']:.1f})"
                            for i in ("stock", "ours")
                        ),
                        f"{idle['ratio']:.2f}x",
                    )
                ],
            )
        )
        add("")
    resume = results.get("resume-streamable", {}).get("summary")
    if resume and resume.get("ours"):
        ours = resume["ours"]
        n = f"{resume['events']:,}"
        add("### 10. Resuming a dropped response stream\n")
        add(
            "Ours only: the SDK ships no `EventStore` (its example `InMemoryEventStore` is not in the `mcp` "
            "package), and stock without one has no resumption"
            + (f" (probed once per run: {p})" if (p := _stock_streamable_probe(resume)) else "")
            + ". A fresh "
            "server per round; a `tools/call replay` POST reads the call's first progress notification and drops "
            "the connection; `GET /replay/go` waits until the response stream is detached, has the tool send "
            f"{n} more {_size(resume['payload_bytes'])} notifications and answers once they are in (the tool "
            "then answers the call). The client GETs `/mcp` with `Mcp-Session-Id` and `Last-Event-ID` set to the "
            "first notification's id and times, from opening the connection, the first replayed event and the "
            f"last (the call's answer), and checks: exactly the {n} notifications in order (progress 2 to "
            f"{resume['events'] + 1}), then the answer, every id once and consecutive after the one it saw. "
            f"{resume['rounds']} rounds, each after a discarded warm-up cycle.\n"
        )
        add(
            _md_table(
                ("", "median", "min-max"),
                [
                    (
                        label,
                        _num(ours[key]["median"], digits),
                        f"{_num(ours[key]['min'], digits)}-{_num(ours[key]['max'], digits)}",
                    )
                    for key, label, digits in (
                        ("head_ms", "reconnect to response head (ms)", 2),
                        ("first_event_ms", "reconnect to first replayed event (ms)", 2),
                        ("all_events_ms", f"reconnect to all {n} and the answer (ms)", 2),
                        ("events_per_s", "replay events/s", 0),
                        ("rss_held_growth_kib", f"RSS growth holding the {n} missed events (KiB)", 0),
                    )
                ],
            )
        )
        add("")
        add(f"Server CPU per replayed event: {_num(ours['server_cpu_us_per_event'], 1)} µs.\n")
    return "\n".join(out)


def _resume_markdown(resume: dict[str, Any]) -> str:
    ours = resume["ours"]
    n = f"{resume['events']:,}"

    def spread(key: str, digits: int) -> tuple[str, str]:
        value = ours[key]
        return _num(value["median"], digits), f"{_num(value['min'], digits)}-{_num(value['max'], digits)}"

    held = ours["rss_held_growth_kib"]["median"]
    rows: list[tuple[str, ...]] = [
        ("reconnect to the response head (ms)", *spread("head_ms", 2)),
        ("reconnect to the first replayed `message` event (ms)", *spread("first_event_ms", 2)),
        (f"reconnect to all {n} replayed events (ms)", *spread("all_events_ms", 2)),
        ("first to last replayed event (ms)", _num(ours["first_to_all_ms"], 2), ""),
        ("replay throughput, reconnect to last event (events/s)", *spread("events_per_s", 0)),
        ("server CPU over the resume, per replayed event (µs)", _num(ours["server_cpu_us_per_event"], 1), ""),
        (f"server RSS growth holding the {n} missed events (KiB)", *spread("rss_held_growth_kib", 0)),
        ("the same, per event (B)", _num(held * 1024 / resume["events"]), ""),
        (f"the producer's {n} sends into the detached session (ms)", _num(ours["produce_ms"], 2), ""),
        ("resumed response on the wire (KiB)", _num(ours["wire_bytes"] / 1024, 0), ""),
    ]
    return "\n".join(
        [
            "Ours only, no ratio: stock has no resumption."
            + (f" Checked in this run: {_stock_probe(resume)}." if _stock_probe(resume) else "")
            + "\n",
            f"A fresh server process per round, our transport with the default `SseConfig` (`session_grace` "
            "30 s, `replay_max_events` 2,000, `max_buffered_events` 1,000). A raw GET `/replay` opens a "
            "session, reads the endpoint event and the first notification (id `<session id>:1`) and drops the "
            "connection (socket abort). A side channel, `GET /replay/go`, waits until the transport's "
            "`statistics()` show the session without a connection (polled; median wait "
            f"{ours['detach_wait_ms']:.2f} ms), then lets the session's own producer push "
            f"{n} notifications of {resume['payload_bytes']:,} B (serialized) into the detached session, "
            "where they wait in its buffer and replay log, and answers once all were accepted. Right after "
            "that answer the client reconnects with the same GET and `Last-Event-ID: <id of the first "
            "event>`, timed from "
            f"opening the new connection (connect, request) to the response head, to the first replayed "
            f"`event: message` and to the {n}th (a raw asyncio socket protocol counting events, as in 1). "
            "Every run checks the resumed stream: the same endpoint event first, then exactly the "
            f"{n} ids after the one sent, in order, and nothing else. One discarded warm-up cycle (50 events) "
            "per server before the measured one. RSS is the server's `VmRSS` just before the push and "
            "right after it was done; CPU is the server's CPU time over the resume (request and replay).\n",
            _md_table((f"{resume['rounds']} rounds", "median", "min-max"), rows),
            "",
            "Most of the time to the first replayed event passes before the response head arrives "
            f"(median {ours['head_ms']['median']:.2f} ms: connect, request, routing, the resume lookup); "
            "the endpoint event and the replay follow in writes of up to 64 KiB. "
            f"After the replay the RSS growth was {_num(ours['rss_after_replay_growth_kib'])} KiB (median): "
            "the session's buffer is released, the replay log keeps the events (until the session ends, or "
            "they pass `replay_max_events`, `replay_max_bytes` or `replay_max_age`), and freed memory mostly "
            "stays with the process's allocator.\n",
        ]
    )


def _spread(value: dict[str, Any], digits: int) -> str:
    """``median (min-max)``."""
    return f"{_num(value['median'], digits)} ({_num(value['min'], digits)}-{_num(value['max'], digits)})"


def _redis_markdown(results: dict[str, Any], plots: list[str]) -> str:
    redis = results["redis"]["summary"]
    info = results["redis"].get("info", {})
    plan = results["plan"]
    v = results["machine"]["versions"]
    out: list[str] = []
    add = out.append
    add(
        "Ours only, against itself: `SseConfig(redis_url=...)` (events in Redis Streams through "
        "`RedisEventStore`, the session directory with owner leases, POSTs and resumed streams passed between "
        "workers over pub/sub) next to the default in-memory store; stock, which has no scale-out, for context "
        "where the scenario allows it. The suite starts a `redis-server` of its own "
        f"({info.get('redis_version')}, no persistence, on 127.0.0.1, a port the kernel picked) and stops it, "
        f"by its PID, at the end. redis-py {v.get('redis')}, "
        + (
            "with hiredis " + str(v.get("hiredis"))
            if v.get("hiredis")
            else "without hiredis (its pure-Python reply parser)"
        )
        + ". Each worker is a `python -m bench.server --impl ours --redis-url ...` process (the same app as "
        "everywhere else, the lowlevel `Server` passed as `server=`, the transport entered for the process's "
        "life); worker A and worker B share one key prefix. Every Redis setting is `SseConfig`'s default "
        f"(`owner_lease` 5 s, `forward_timeout` 3 s) except in the takeover runs (`owner_lease` "
        f"{info.get('takeover_lease_s', plan.get('takeover_lease')):g} s). Each ratio is of medians of this one "
        "run, the variants rotating which goes first from round to round.\n"
    )
    rows: list[tuple[str, ...]] = [("Measurement", "in-memory store", "Redis", "Redis/memory")]
    add(_md_table(rows[0], redis_rows(results)))
    add("")
    if PLOT_REDIS in plots:
        add(f"![in-memory vs Redis: throughput and resume]({PLOT_REDIS})\n")

    transport = redis.get("transport")
    if transport:
        add("### Transport alone and full stack\n")
        add(
            "The scenario of 1 (`GET /push`: N notifications of S bytes pushed into `connect_sse`'s write "
            "stream, counted by a raw socket client), served by three processes: stock, ours with the "
            "in-memory store, ours with `redis_url` (worker A; worker B idle). "
            f"{plan['redis_rounds']} rounds, one discarded warm-up run each. With Redis every event is appended "
            "to the session's stream (`XADD` in a Lua script) before it is written; CPU columns are the server "
            "process's and the `redis-server` process's CPU time over the run, per event.\n"
        )
        trows: list[tuple[str, ...]] = []
        for size, row in transport.items():
            trows.append(
                (
                    _size(int(size)),
                    f"{row['events']:,}",
                    _num(row["stock"]["events_per_s"]["median"]),
                    _spread(row["memory"]["events_per_s"], 0),
                    _spread(row["redis"]["events_per_s"], 0),
                    f"{row['redis_over_memory']:.2f}x",
                    f"{row['redis_over_stock']:.2f}x",
                    _num(row["memory"]["server_cpu_us_per_event"], 1),
                    _num(row["redis"]["server_cpu_us_per_event"], 1),
                    _num(row["redis"]["redis_cpu_us_per_event"], 1),
                )
            )
        add(
            _md_table(
                (
                    "payload",
                    "N",
                    "stock events/s",
                    "ours, memory events/s (min-max)",
                    "ours, Redis events/s (min-max)",
                    "Redis/memory",
                    "Redis/stock",
                    "server CPU µs/event, memory",
                    "server CPU µs/event, Redis",
                    "redis-server CPU µs/event",
                ),
                trows,
            )
        )
        add("")
    full = redis.get("fullstack")
    if full:
        add(
            f"Full stack (the scenario of 2: a lowlevel `Server` tool sending {full['notifications']:,} progress "
            "notifications, called through the SDK client, one discarded warm-up call per session; "
            f"{plan['redis_full_rounds']} rounds). With Redis the POSTed `tools/call` is recorded as pending in "
            "Redis and each notification appended to the stream.\n"
        )
        add(
            _md_table(
                ("", "stock", "ours, memory", "ours, Redis"),
                [
                    (
                        "notifications/s, median (min-max)",
                        *(_spread(full[impl]["notifications_per_s"], 0) for impl in ("stock", "memory", "redis")),
                    ),
                    (
                        "server CPU µs/notification",
                        *(
                            _num(full[impl]["server_cpu_us_per_notification"], 1)
                            for impl in ("stock", "memory", "redis")
                        ),
                    ),
                    (
                        "redis-server CPU µs/notification",
                        "—",
                        "—",
                        _num(full["redis"]["redis_cpu_us_per_notification"], 1),
                    ),
                ],
            )
        )
        add("")
        add(
            f"Redis/memory {full['redis_over_memory']:.2f}x, Redis/stock {full['redis_over_stock']:.2f}x "
            "(medians): in this scenario the SDK client and server dominate each notification's cost.\n"
        )

    ping = redis.get("ping")
    if ping:
        add("### A POST handed to another worker\n")
        add(
            "An initialized MCP session driven over raw sockets (as in 3): sequential `ping` requests, each a POST "
            "on a keep-alive connection whose response is read off the session's SSE stream, for "
            f"{ping['seconds']:g} s per round after 0.2 s of warm-up, {plan['redis_rounds']} rounds, samples "
            "pooled. Three setups: the in-memory server; the stream and the POSTs on Redis worker A; the stream "
            "on A and the POSTs to worker B, which looks the session up in Redis, hands each POST to A over "
            "pub/sub and answers with A's status.\n"
        )
        labels = {
            "memory": "in-memory store, one process",
            "redis-owner": "Redis, POSTs to the owner (A)",
            "redis-forwarded": "Redis, POSTs to worker B (handed to A)",
        }
        add(
            _md_table(
                ("POSTs", "p50 (ms)", "p99 (ms)", "pings"),
                [
                    (labels[k], _ms(ping[k]["p50_ms"], 2), _ms(ping[k]["p99_ms"], 2), f"{ping[k]['pings']:,}")
                    for k in labels
                ],
            )
        )
        add("")

    resume = redis.get("resume")
    if resume:
        n = f"{resume['events']:,}"
        add("### Resume across workers\n")
        add(
            "The cycle of 5, with the session opened on one server: a raw `GET /replay` reads the endpoint event "
            "and the first notification and drops the connection; `GET /replay/go` on the same server waits "
            f"until the session shows no connection, has the session's producer push {n} notifications of "
            f"{resume['payload_bytes']:,} B into it and answers once all were accepted; the client then "
            "reconnects with `Last-Event-ID` set to the first event's id, timed from opening the connection to "
            f"the response head, the first replayed `message` event and the {n}th, and checks the stream (the "
            f"same endpoint event, then {n} ids after the one sent, in order, nothing else; Redis stream ids are "
            "not consecutive, so they are checked for order). Three setups, each with one discarded warm-up "
            "cycle: the in-memory server (section 5's number, measured again in this run); opened and resumed "
            "on Redis worker A, the session's owner; opened on A and resumed on worker B, which serves it "
            "itself: replays from Redis, then relays A's live events through Redis. "
            f"{resume['memory']['rounds']} rounds. CPU is both workers' CPU time over the resume, per event.\n"
        )
        labels = {
            "memory": "in-memory store, one process",
            "redis-owner": "Redis, resumed on the owner (A)",
            "redis-other": "Redis, resumed on worker B",
        }
        add(
            _md_table(
                (
                    "resume",
                    "to response head (ms)",
                    "to first replayed event (ms)",
                    f"to all {n} (ms)",
                    "replay events/s",
                    "server CPU µs/event",
                ),
                [
                    (
                        labels[k],
                        _ms(resume[k]["head_ms"]["median"], 2),
                        _spread(resume[k]["first_event_ms"], 2),
                        _spread(resume[k]["all_events_ms"], 2),
                        _num(resume[k]["events_per_s"]["median"]),
                        _num(resume[k]["server_cpu_us_per_event"], 1),
                    )
                    for k in labels
                ],
            )
        )
        add("")
        add(
            f"The producer's {n} sends into the detached session took (median) "
            f"{_ms(resume['memory']['produce_ms'], 2)} ms with the in-memory store, "
            f"{_ms(resume['redis-owner']['produce_ms'], 2)} ms with Redis: at the commit measured (see "
            "Machine) a send into a session with no connection stores its event at once (a round trip each, "
            "shared by producers that send together), so that what a detached session produces survives its "
            "worker; while a connection is attached, the writer stores what waits in one call instead. So a "
            "resume, on the owner or on worker B, reads the missed events back from Redis (one `XRANGE`, whose "
            "reply redis-py parses "
            + ("with hiredis" if v.get("hiredis") else "in pure Python: hiredis is not installed")
            + "); worker B then relays the live events from A.\n"
        )

    takeover = redis.get("takeover")
    if takeover:
        add("### Takeover of a dead worker's session\n")
        add(
            f"{takeover['rounds']} round{'s' if takeover['rounds'] != 1 else ''}, each with two fresh workers, "
            "`owner_lease` "
            f"{takeover['owner_lease_s']:g} s (renewed every third of it; the default is 5 s). On worker A a raw "
            "client opens `GET /sse`, initializes the session (POSTs to A) and calls the `progress` tool with a "
            f"notification every {takeover['interval_s'] * 1000:g} ms; after {plan.get('takeover_warm_events', 20)} "
            "notifications the suite reads the lease's remaining time from Redis (`PTTL`), then SIGKILLs A by its "
            "PID. The client reads A's stream to its end, then at once (ignoring the `retry:` hint a real client "
            "waits for) resumes on worker B with the last id it saw. B sends the response head at once, finds "
            "nobody listening on A's channel, waits for A's lease to run out, takes the session over (a fresh "
            "server fed the stored handshake), then sends the endpoint event, what Redis holds after that id, and "
            "the answer to the interrupted `tools/call`, a JSON-RPC error (code "
            f"{', '.join(takeover['interrupted_codes'])}): that error is where the stream goes on. Then a ping "
            "through B checks the session is served there. Times are from the SIGKILL.\n"
        )
        add(
            _md_table(
                ("", "median", "min-max"),
                [
                    (
                        "lease left at the kill (ms)",
                        _ms(takeover["lease_left_ms"]["median"], 0),
                        f"{_ms(takeover['lease_left_ms']['min'], 0)}-{_ms(takeover['lease_left_ms']['max'], 0)}",
                    ),
                    ("client saw A's stream end (ms)", _ms(takeover["eof_ms"], 1), ""),
                    (
                        "B's endpoint event on the resumed stream (ms)",
                        _ms(takeover["endpoint_ms"]["median"], 1),
                        f"{_ms(takeover['endpoint_ms']['min'], 1)}-{_ms(takeover['endpoint_ms']['max'], 1)}",
                    ),
                    (
                        "stream goes on: B's answer to the interrupted call (ms)",
                        _ms(takeover["continued_ms"]["median"], 0),
                        f"{_ms(takeover['continued_ms']['min'], 0)}-{_ms(takeover['continued_ms']['max'], 0)}",
                    ),
                    ("the same, beyond the lease left at the kill (ms)", _ms(takeover["beyond_lease_ms"], 1), ""),
                    ("events replayed from Redis before it", _num(takeover["replayed"]), ""),
                    ("then a ping through B, round trip (ms)", _ms(takeover["ping_after_ms"], 2), ""),
                ],
            )
        )
        add("")
        add(
            "The outage is the lease: a dead worker's session moves once its lease runs out, so with the "
            "default `owner_lease` of 5 s expect up to 5 s plus the same few milliseconds, and a real client "
            "also waits its `retry:` interval before reconnecting.\n"
        )

    add("Caveats:\n")
    add(
        "\n".join(
            [
                f"- One host with {results['machine']['nproc']} cores for everything: the client, stock, both "
                "in-memory and Redis workers and `redis-server` share them, and Redis is reached over loopback "
                "(no network latency, no second machine's CPU). A real deployment puts Redis a network round trip "
                "away, which adds to every append batch, lookup and hand-over.",
                "- Each server process is idle while another one is measured, but the client runs in the suite's "
                "process on the same cores; small runs (the in-memory store at 200 B finishes in a fraction of a "
                "second) are noisy, hence the min-max.",
                "- Ratios are of this run's medians; compare them, not absolute figures, across machines.",
                "- Redis runs with its defaults and no persistence (`--save '' --appendonly no`); with AOF or "
                "replication each append costs more.",
                "- The in-memory store keeps events in the worker's process; the Redis figures buy resumption on "
                "any worker and surviving a worker's death.",
            ]
        )
    )
    add("")
    return "\n".join(out)


def write_docs(results: dict[str, Any], json_path: Path, docs: Path = DOCS) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, docs)
    try:
        shown = str(json_path.resolve().relative_to(REPO))
    except ValueError:
        shown = str(json_path)
    path = docs / "benchmarks.md"
    path.write_text(markdown(results, plots, shown))
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m bench --report RESULTS.json")
