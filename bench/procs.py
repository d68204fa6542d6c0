"""What the benchmarks do with processes and ports: a child process in its own session
(:class:`Daemon`, :class:`Routed`: a ``discovery watch`` with its HAProxy), the ``discovery``
command line, a process's RSS and CPU, the host's CPU and TCP counters, HTTP probes and the
polling wait with a deadline. It imports :mod:`common`, never the other way round.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from common import BENCH, ROOT, Unmeasured

from discovery.errors import DiscoveryError
from discovery.watcher.haproxy import HAProxyMaster

T = TypeVar("T")
HOST = "127.0.0.1"
HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"


# --------------------------------------------------------------------------- processes


class Daemon:
    """A child process in its own session, output to a log file, stopped by its pid."""

    def __init__(self, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv, self.log_path = list(argv), log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() just before the exec

    def start(self) -> Self:
        compile_package()
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        return p.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@functools.cache  # once a bench process: a file edited during a bench is not benched anyway
def compile_package() -> None:
    """Byte-compile the package's modules (``__pycache__``, ignored by git) where their
    bytecode is missing or stale, as ``pip install`` does for a user. The benches run the
    editable install, and this machine's environment sets ``PYTHONDONTWRITEBYTECODE``: each
    process started compiled every module it imported from source again, ~0.1 s of a
    watcher's start at 1,000 services (bench/scale.py, py-spy)."""
    compileall.compile_dir(str(ROOT / "discovery"), quiet=1)


def discovery_cmd(*args: str, log_level: str = "info") -> list[str]:
    """``discovery`` with ``args``; its log level ``BENCH_LOG_LEVEL`` when set (debug, to see
    why a run missed), else ``log_level``."""
    level = os.environ.get("BENCH_LOG_LEVEL", log_level)
    return [sys.executable, "-m", "discovery", "--log-level", level, *args]


def _kill_pidfile(pidfile: Path, must_contain: str) -> None:
    """SIGTERM (then SIGKILL) the process named in ``pidfile`` if its command line has
    ``must_contain``: a watcher's HAProxy left behind when the watcher had to be killed."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return
    if "haproxy" not in cmdline or must_contain not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Routed(Daemon):
    """``discovery watch`` (or the baseline driver) with its own HAProxy in a short state dir."""

    def __init__(self, argv: Sequence[str], state_dir: Path, log_path: Path) -> None:
        super().__init__(argv, log_path)
        self.state_dir = state_dir

    @classmethod
    def watcher(cls, url: str, services: Mapping[str, int], work: Path, *extra: str,
                log_level: str = "info", config: Path | None = None) -> Routed:
        state = Path(tempfile.mkdtemp(prefix="rtw-", dir="/tmp"))  # sun_path <= 107 bytes
        args = ["watch", "--registry", url, "--state-dir", str(state),
                "--haproxy-bin", HAPROXY_BIN]
        for name, port in services.items():
            args += ["--service", f"{name}:{port}"]
        if config is not None:
            args += ["--config", str(config)]
        return cls(discovery_cmd(*args, *extra, log_level=log_level), state,
                   work / f"watcher-{state.name}.log")

    @classmethod
    def baseline(cls, url: str, services: Mapping[str, int], work: Path,
                 tuning: str = "best") -> Routed:
        state = Path(tempfile.mkdtemp(prefix="rtb-", dir="/tmp"))
        argv = [sys.executable, str(BENCH / "reload_per_change.py"), "--registry", url,
                "--state-dir", str(state), "--haproxy-bin", HAPROXY_BIN, "--tuning", tuning,
                "--stats-out", str(work / f"baseline-{state.name}.json")]
        for name, port in services.items():
            argv += ["--service", f"{name}:{port}"]
        return cls(argv, state, work / f"baseline-{state.name}.log")

    @property
    def stats_path(self) -> Path:
        return self.log_path.with_suffix(".json")

    def wait_ready(self, ports: Sequence[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise Unmeasured(f"{self.argv[2:4]} exited:\n{self.log_tail()}")
            if (self.state_dir / "admin.sock").exists() and all(port_open(p) for p in ports):
                return
            if time.monotonic() >= deadline:
                raise Unmeasured(f"HAProxy of {self.log_path.name} not serving within "
                                 f"{timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def reload_count(self) -> int | None:
        try:
            return HAProxyMaster(str(self.state_dir / "master.sock"),
                                 connect_grace=1.0).reload_count()
        except DiscoveryError:
            return None

    def old_workers(self) -> int | None:
        try:
            return len(HAProxyMaster(str(self.state_dir / "master.sock"),
                                     connect_grace=1.0).show_proc().old_workers)
        except DiscoveryError:
            return None

    def haproxy_master_pid(self) -> int | None:
        try:
            return int((self.state_dir / "haproxy.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        self.stop()
        _kill_pidfile(self.state_dir / "haproxy.pid", str(self.state_dir))
        shutil.rmtree(self.state_dir, ignore_errors=True)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon (KiB) of ``pid`` from /proc."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


class HostLoad:
    """Whole-host CPU busy % (``/proc/stat``) and TCP counters between ``start()`` and
    ``read()`` (``nstat``'s sources): ``TcpExtListenOverflows`` / ``TcpExtListenDrops`` (SYNs
    dropped because an accept queue was full, which costs the client a SYN retransmit, 1 s
    initial RTO), ``TcpExtTCPSynRetrans`` and ``TcpRetransSegs``. Other processes on the host
    (other benches and test suites) are included: that is the point."""

    COUNTERS = {"tcp_listen_overflows": ("TcpExt", "ListenOverflows"),
                "tcp_listen_drops": ("TcpExt", "ListenDrops"),
                "tcp_syn_retrans": ("TcpExt", "TCPSynRetrans"),
                "tcp_retrans_segs": ("Tcp", "RetransSegs")}

    def __init__(self) -> None:
        self._cpu: list[int] = []
        self._tcp: dict[str, int] = {}

    @staticmethod
    def _cpu_now() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    @classmethod
    def tcp_counters(cls) -> dict[str, int]:
        tables: dict[str, dict[str, str]] = {}
        for name in ("/proc/net/netstat", "/proc/net/snmp"):
            try:
                lines = Path(name).read_text().splitlines()
            except OSError:
                continue
            for head, values in zip(lines[::2], lines[1::2], strict=False):
                kind = head.split(":", 1)[0]
                tables[kind] = dict(zip(head.split()[1:], values.split()[1:], strict=False))
        return {key: int(tables.get(kind, {}).get(field, 0))
                for key, (kind, field) in cls.COUNTERS.items()}

    def start(self) -> Self:
        self._cpu, self._tcp = self._cpu_now(), self.tcp_counters()
        return self

    def read(self) -> dict[str, Any]:
        b = self._cpu_now()
        total = sum(b) - sum(self._cpu)
        idle = (b[3] + b[4]) - (self._cpu[3] + self._cpu[4])
        busy = round(100.0 * (total - idle) / total, 1) if total > 0 else None
        now = self.tcp_counters()
        return {"host_cpu_busy_pct": busy, "host_cpus": os.cpu_count(),
                **{k: now[k] - self._tcp.get(k, 0) for k in now}}


def cpu_ticks(pid: int, *, tree: bool = True) -> int:
    """utime + stime + cutime + cstime of ``pid`` (clock ticks), plus its live children's
    (recursively) with ``tree``; 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    ticks = sum(int(x) for x in fields[11:15])
    if tree:
        ticks += sum(cpu_ticks(c) for c in children_of(pid))
    return ticks


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


# --------------------------------------------------------------------------- HTTP

def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def http_get(port: int, timeout: float = 2.0) -> tuple[int, str]:
    """One ``GET /`` on a new connection (``Connection: close``): (status, stripped body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def answers_200(port: int) -> bool:
    return http_get(port)[0] == 200


def wait_until(pred: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.02) -> T:
    """Poll ``pred`` until truthy (exceptions count as "not yet"); Unmeasured on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = pred()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise Unmeasured(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
