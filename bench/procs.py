"""Benchmark server processes: start, read RSS and CPU time from /proc, stop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu_clock_id(pid: int) -> int | bool:
    """The CPU-time clock of process ``pid``, or False where libc or the kernel won't give it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        clock_id = ctypes.c_int()
        if libc.clock_getcpuclockid(pid, ctypes.byref(clock_id)) != 0:
            return False
        time.clock_gettime(clock_id.value)
        return clock_id.value
    except (OSError, AttributeError):
        return False


class ServerProc:
    """One ``python -m bench.server`` process; ``port`` and ``pid`` once started."""

    def __init__(self, impl: str, args: list[str], log: Path) -> None:
        self.impl = impl
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._clock_id: int | bool | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "bench.server", "--impl", self.impl, *self.args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    async def start(self, time_limit: float = 30) -> ServerProc:
        """Start the server and wait (at most ``time_limit`` s) for its ``READY <port>`` line."""
        self.proc = self._spawn()
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), time_limit)
        except BaseException:
            self.kill()
            raise
        parts = line.decode().split()
        if not parts or parts[0] != "READY":
            self.kill()
            raise RuntimeError(f"{self.impl} server did not start (see {self.log}): {line!r}")
        self.port = int(parts[1])
        return self

    def _status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM, ...)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time of the whole process so far (all threads): its CPU-time clock, read with
        ``clock_getcpuclockid`` (ns resolution), else user + system ticks from ``/proc/<pid>/stat``."""
        if self._clock_id is None:
            self._clock_id = _cpu_clock_id(self.pid)
        if self._clock_id is not False:
            try:
                return time.clock_gettime(self._clock_id)
            except OSError:
                self._clock_id = False
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    async def stop(self, time_limit: float = 5) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), time_limit)
        except TimeoutError:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
