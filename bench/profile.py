"""Profile a server under the transport-alone load: ``python -m bench.profile [--impl ours] [--size 200]``.

Starts ``bench.server`` under pyinstrument (or, with ``--py-spy``, under ``py-spy record``), drives
``GET /push`` at the given payload size for ``--runs`` runs of ``--events`` events, stops the server
and writes the profile to bench/results/profile-<impl>-<size>B.{txt,html} (py-spy: .svg flame graph
and a collapsed-stack .txt, whose top frames ``--top`` prints). ``--redis`` profiles ours with
``redis_url`` on a redis-server the profiler starts and stops itself (files ``profile-ours-redis-...``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .client import push_run
from .procs import REPO, RedisProc

RESULTS = REPO / "bench" / "results"


async def drive(port: int, runs: int, events: int, size: int) -> None:
    await push_run(port, 2000, size, 60)  # warm-up
    for i in range(runs):
        r = await push_run(port, events, size, 120)
        print(f"run {i + 1}/{runs}: {r['events_per_s']:,.0f} events/s", flush=True)


def top_collapsed(path: Path, needle: str, top: int) -> list[tuple[str, float, float]]:
    """(frame, self %, total %) of frames whose text contains ``needle``, from a py-spy collapsed file."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        samples += n
        self_counts[frames[-1]] += n
        for frame in set(frames):
            total_counts[frame] += n
    rows = [(f, self_counts[f] / samples * 100, total_counts[f] / samples * 100) for f in total_counts if needle in f]
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=("stock", "ours"), default="ours")
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--py-spy", action="store_true", help="sample with py-spy instead of pyinstrument")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--redis", action="store_true", help="ours with redis_url, on a redis-server of its own")
    args = parser.parse_args(argv)
    if args.redis and args.impl != "ours":
        parser.error("--redis is for --impl ours")

    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"profile-{args.impl}{'-redis' if args.redis else ''}-{args.size}B"
    redis = RedisProc(Path(f"{base}.redis.log")).start() if args.redis else None
    try:
        return _profile(args, base, redis)
    finally:
        if redis is not None:
            redis.stop()


def _profile(args: argparse.Namespace, base: Path, redis: RedisProc | None) -> int:
    server_cmd = [sys.executable, "-m", "bench.server", "--impl", args.impl]
    if redis is not None:
        server_cmd += ["--redis-url", redis.url]
    if args.py_spy:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [
            py_spy,
            "record",
            "--rate",
            "1000",
            "--format",
            "raw",
            "--output",
            f"{base}.collapsed.txt",
            "--",
            *server_cmd,
        ]
    else:
        cmd = [*server_cmd, "--profile", str(base)]
    with open(f"{base}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line: list[str] = []
        for _ in range(20):  # py-spy prints a banner first
            raw = proc.stdout.readline()
            line = raw.decode().split()
            if not raw or (line and line[0] == "READY"):
                break
        if not line or line[0] != "READY":
            print(f"server did not start, see {base}.log", file=sys.stderr)
            return 1
        port, server_pid = int(line[1]), int(line[2])
        asyncio.run(drive(port, args.runs, args.events, args.size))
        # Stop the server itself (under py-spy it is a grandchild), so the profile gets written.
        import os

        os.kill(server_pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if args.py_spy:
        collapsed = Path(f"{base}.collapsed.txt")
        subprocess.run([cmd[0], "--version"], check=False)
        print(f"\ncollapsed stacks: {collapsed.relative_to(REPO)}")
        print(f"\ntop frames in mcp_sse_transport (self %, total %) of {args.impl} at {args.size} B:")
        for frame, self_pct, total_pct in top_collapsed(collapsed, "mcp_sse_transport", args.top):
            print(f"  {self_pct:5.1f}  {total_pct:5.1f}  {frame}")
    else:
        print(f"\nprofile: {base.relative_to(REPO)}.txt / .html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
