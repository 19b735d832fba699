"""Benchmark the stock SDK SSE transport against ours, side by side: ``python -m bench [--quick]``.

Runs, alternating between the two transports each round: (1) transport alone, events/s by event
size; (2) full stack, notifications/s through the SDK client; (3) a stalled client: memory, producer
release, another session's latency; (4) idle sessions, server RSS per session; (5) resumption (ours
only): reconnect to first replayed event, replay throughput, memory held; (6) scale-out on Redis
(ours with the in-memory store vs ours with redis_url, stock for context; a redis-server of its own):
events/s, full stack, POSTs handed to another worker, resume on the owner and on another worker,
takeover after SIGKILL; (7-10) Streamable HTTP, the SDK's session manager against ours: progress
notifications/s on a POST's response stream, a stalled response stream and the same session's
pings, RSS per idle session, resuming a dropped response stream (ours). Prints a table,
writes every sample to bench/results/<timestamp>.json (and latest.json), and regenerates
docs/benchmarks.md and its plots. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from . import runner, streamable
from .procs import REPO
from .report import console_table, machine_info, write_docs
from .server import raise_fd_limit

SECTIONS = (
    "transport",
    "fullstack",
    "stalled",
    "idle",
    "resume",
    "redis",
    *streamable.BENCHES,  # streamable, stalled-streamable, idle-streamable, resume-streamable
)
RESULTS = REPO / "bench" / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and events: about a minute")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="override the transport-alone round count")
    parser.add_argument("--sessions", type=int, default=None, help="override the idle session count (1000)")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument(
        "--docs",
        action="store_true",
        default=None,
        help="regenerate docs/benchmarks.md and plots (default: only after a full, non-quick run)",
    )
    docs.add_argument("--no-docs", dest="docs", action="store_false", help="never regenerate the docs")
    parser.add_argument(
        "--report",
        metavar="RESULTS_JSON",
        default=None,
        help="run nothing: print the table and regenerate docs from a results file",
    )
    return parser.parse_args(argv)


async def run_all(plan: runner.Plan, sections: list[str], logdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    benches = {
        "transport": runner.bench_transport,
        "fullstack": runner.bench_fullstack,
        "stalled": runner.bench_stalled,
        "idle": runner.bench_idle,
        "resume": runner.bench_resume,
        "redis": runner.bench_redis,
        **streamable.BENCHES,
    }
    for name in sections:
        runner.log(f"== {name}")
        out[name] = await benches[name](plan, logdir)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report:
        path = Path(args.report)
        saved: dict[str, Any] = json.loads(path.read_text())
        runner.resummarize(saved)
        print(console_table(saved))
        if args.docs is not False:
            print(f"\nwrote {write_docs(saved, path)}")
        return 0

    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown section(s): {', '.join(sorted(unknown))}")
    full = sections == list(SECTIONS)
    if "redis" in sections and (missing := runner.redis_available()) is not None:
        if not full:
            sys.exit(f"--only redis: {missing}")
        runner.log(f"skipping the redis section: {missing}")
        sections.remove("redis")
    plan = runner.Plan.quick() if args.quick else runner.Plan()
    if args.rounds is not None:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.sessions is not None:
        plan = dataclasses.replace(plan, idle_sessions=args.sessions)

    fd_limit = raise_fd_limit()
    if {"idle", "idle-streamable"} & set(sections) and fd_limit < plan.idle_sessions + 256:
        sys.exit(f"the open-file limit ({fd_limit}) is too low for {plan.idle_sessions} sessions")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "logs" / stamp
    command = "python -m bench" + (
        "" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    started = time.time()
    results: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": machine_info(),
        "plan": dataclasses.asdict(plan),
        "sections": sections,
    }
    runner.log(f"{command}: sections {', '.join(sections)}; server logs in {logdir.relative_to(REPO)}")
    results.update(asyncio.run(run_all(plan, sections, logdir)))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["wall_seconds"] = time.time() - started

    path = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    text = json.dumps(results, indent=1)
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    print()
    print(console_table(results))
    print(f"\nresults: {path.relative_to(REPO)}")
    docs = args.docs if args.docs is not None else (not args.quick and full)
    if docs:
        print(f"docs:    {write_docs(results, path).relative_to(REPO)}")
    else:
        print(
            "docs not regenerated (a quick or partial run); to do so: "
            f"python -m bench --report {path.relative_to(REPO)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
