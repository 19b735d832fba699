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
    return made


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
        "below 1 is better for memory, latency and CPU.\n"
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
            ]
        )
    )
    add("")
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
