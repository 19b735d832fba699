"""Benchmark server processes (and the Redis the scale-out scenario shares): start, read RSS and
CPU time from /proc, stop; each by its own PID."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


def process_cpu_seconds(pid: int, clock_id: int | bool | None) -> tuple[float, int | bool]:
    """CPU time of process ``pid`` so far (all threads), and the clock id to pass next time: its
    CPU-time clock, read with ``clock_getcpuclockid`` (ns resolution), else user + system ticks
    from ``/proc/<pid>/stat``."""
    if clock_id is None:
        clock_id = _cpu_clock_id(pid)
    if clock_id is not False:
        try:
            return time.clock_gettime(clock_id), clock_id
        except OSError:
            clock_id = False
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), False


class ServerProc:
    """One ``python -m bench.server`` process; ``port`` and ``pid`` once started. ``label`` names
    it in logs and results (default: ``impl``), e.g. ``ours-redis`` for ours with ``--redis-url``."""

    def __init__(self, impl: str, args: list[str], log: Path, label: str | None = None) -> None:
        self.impl = impl
        self.label = label or impl
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
            raise RuntimeError(f"{self.label} server did not start (see {self.log}): {line!r}")
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
        """CPU time of the whole process so far (all threads); see :func:`process_cpu_seconds`."""
        seconds, self._clock_id = process_cpu_seconds(self.pid, self._clock_id)
        return seconds

    def kill(self) -> None:
        """SIGKILL, to this process only (a crash, for the takeover measurement; or a cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

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


REDIS_READY = b"Ready to accept connections"


class RedisProc:
    """A ``redis-server`` of the suite's own, for the scale-out scenario: loopback, a port the
    kernel picked, no persistence, in a temporary directory; ready once its log (on stdout) says
    so. Stopped by its PID (SIGTERM, then SIGKILL after ``time_limit``); never a shared Redis."""

    def __init__(self, log: Path, binary: str | None = None) -> None:
        self.log = log
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""
        self._dir: str | None = None
        self._drainer: threading.Thread | None = None
        self._clock_id: int | bool | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, time_limit: float = 10) -> RedisProc:
        """Start on a free port (a few tries: the port is freed just before Redis binds it)."""
        if not os.path.exists(self.binary):
            raise RuntimeError(f"redis-server not found ({self.binary}): apt-get install redis-server")
        self.version = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False).stdout
        self.version = next((w[2:] for w in self.version.split() if w.startswith("v=")), self.version.strip())
        self._dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if self._spawn(port, time_limit):
                self.port = port
                return self
        self.stop()
        raise RuntimeError(f"redis-server did not start (see {self.log})")

    def _spawn(self, port: int, time_limit: float) -> bool:
        assert self._dir is not None
        args = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self._dir, "--logfile", "", "--daemonize", "no"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout
        seen = b""
        deadline = time.monotonic() + time_limit
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            while REDIS_READY not in seen:
                remaining = deadline - time.monotonic()
                chunk = os.read(out.fileno(), 65536) if remaining > 0 and selector.select(remaining) else None
                if not chunk:  # exited (port taken) or too slow: its log says why
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait(5)
                    out.close()
                    with open(self.log, "ab") as log:
                        log.write(seen)
                    return False
                seen += chunk
        self.proc = proc
        self._drainer = threading.Thread(target=self._drain, args=(seen,), daemon=True)
        self._drainer.start()
        return True

    def _drain(self, seen: bytes) -> None:
        """Copy the server's log to ``self.log`` until it exits, so it never blocks on a full pipe."""
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log, "ab") as log, self.proc.stdout as out:
            log.write(seen)
            for line in out:
                log.write(line)

    def cpu_seconds(self) -> float:
        seconds, self._clock_id = process_cpu_seconds(self.pid, self._clock_id)
        return seconds

    def stop(self, time_limit: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(time_limit)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if self._drainer is not None:
                self._drainer.join(5)
                self._drainer = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
