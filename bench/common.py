"""What every benchmark shares: statistics, the raw result file, processes, HTTP probes.

Scripts in this folder import it directly (``from common import ...``); it imports no other
benchmark, so there is no cycle between them. Each benchmark writes
its raw result with :func:`write_result` to ``bench/results/<bench>-<backend>.json``; the tables
in ``docs/benchmarks.md`` are generated from those files (``scripts/gen_benchmarks.py``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self, TypeVar

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from discovery.errors import DiscoveryError  # noqa: E402
from discovery.watcher.haproxy import HAProxyMaster  # noqa: E402

RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 1]."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def _zookeeper_version() -> str | None:
    jars = sorted(Path("/usr/share/java").glob("zookeeper-3*.jar"))
    return jars[-1].stem.removeprefix("zookeeper-") if jars else None


def default_wait() -> str:
    """The watcher's default quiescence window, read from the code: ``"20ms:500ms (default)"``."""
    from discovery.watcher.config import WatcherConfig

    cfg = WatcherConfig()
    return f"{cfg.wait_min * 1000:g}ms:{cfg.wait_max * 1000:g}ms (default)"


def machine() -> dict[str, Any]:
    """What ran the benchmark: cores, kernel, load, and the versions of every component."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "docker": _version(["docker", "version", "--format", "{{.Server.Version}}"]),
        "etcd": _version(["etcd", "--version"]),
        "zookeeper": _zookeeper_version(),
        "haproxy": _version(["haproxy", "-v"]),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The commit measured: ``git rev-parse HEAD``, or ``.bench-commit`` in an exported tree."""
    marker = ROOT / ".bench-commit"
    if marker.exists():
        return marker.read_text().strip()
    return _version(["git", "-C", str(ROOT), "rev-parse", "HEAD"])


def started() -> str:
    """The UTC start time, as written into a result."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_result(bench: str, backend: str, *, started_at: str, summary: dict[str, Any],
                 samples: Any, argv: Sequence[str] | None = None,
                 machine_info: dict[str, Any] | None = None) -> Path:
    """Write ``bench/results/<bench>-<backend>.json`` (command, machine, UTC start time, raw
    samples, summary) and return its path. ``backend`` is ``etcd``, ``zk`` or ``none``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else None
    command = " ".join([".venv/bin/python", f"bench/{script.name}" if script else "?", *argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}-{backend}.json"
    doc = {"bench": bench, "backend": backend, "command": command,
           "machine": machine_info or machine(), "started_utc": started_at,
           "finished_utc": started(), "wall_s": None, "summary": summary, "samples": samples}
    doc["wall_s"] = round(time.time() - datetime.strptime(
        started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp(), 1)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------ processes, probes, reports

T = TypeVar("T")
HOST = "127.0.0.1"
HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"

def say(text: str) -> None:
    """Progress on stderr, prefixed with the running script's name."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"
    print(f"[{name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Interrupted(BaseException):  # like KeyboardInterrupt: not caught as an Exception
    """SIGINT/SIGTERM: unwind through every ``finally`` (which cleans up)."""


class Unmeasured(Exception):
    """A phase could not be measured (a server, process or container did not come up)."""


_interrupted = False


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _interrupted
    if _interrupted:
        return  # cleanup is already running: don't interrupt it
    _interrupted = True
    raise Interrupted(f"signal {signum}")


def install_signal_handlers() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


# --------------------------------------------------------------------------- reporting


def _r(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v, 2)


class Report:
    """Collects metric rows; each is printed as one JSON line at once (and kept)."""

    def __init__(self, json_out: Path | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.json_out = json_out
        self.unmeasured: list[str] = []

    def emit(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        line = json.dumps(row, sort_keys=False)
        print(line, flush=True)
        if self.json_out is not None:
            with self.json_out.open("a") as f:
                f.write(line + "\n")
        return row

    def latency(self, name: str, backend: str, values_ms: Sequence[float], *,
                expected: int, target_ms: float | None, **extra: Any) -> dict[str, Any]:
        """A latency row: pass = every expected sample measured and p99 <= target."""
        p99 = percentile(values_ms, 0.99)
        ok: bool | None = None
        if target_ms is not None:
            ok = len(values_ms) == expected and not math.isnan(p99) and p99 <= target_ms
        return self.emit({
            "name": name, "backend": backend, "n": len(values_ms), "expected": expected,
            "p50_ms": _r(percentile(values_ms, 0.5)), "p99_ms": _r(p99),
            "min_ms": _r(min(values_ms)) if values_ms else None,
            "max_ms": _r(max(values_ms)) if values_ms else None,
            "target": None if target_ms is None else f"p99 <= {target_ms:g} ms",
            "pass": ok, **extra})

    def failed(self) -> bool:
        return any(r.get("pass") is False for r in self.rows)

    def mark(self) -> tuple[int, str, dict[str, Any]]:
        """Where a result starts: (rows so far, UTC start time, the machine now)."""
        return len(self.rows), started(), machine()

    def save(self, bench: str, backend: str, mark: tuple[int, str, dict[str, Any]],
             samples: Any) -> Path:
        """Write the rows emitted since ``mark`` and ``samples`` as one raw result."""
        since, started_at, machine_info = mark
        path = write_result(bench, backend, started_at=started_at, machine_info=machine_info,
                            summary={"rows": self.rows[since:]}, samples=samples)
        say(f"raw result: {path.relative_to(ROOT)}")
        return path


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


def discovery_cmd(*args: str, log_level: str = "info") -> list[str]:
    return [sys.executable, "-m", "discovery", "--log-level", log_level, *args]


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



def summary(report: Report) -> str:
    lines = ["", "metric                     backend  mode               n      p50 ms   "
             "p99 ms   target                       pass"]
    for r in report.rows:
        lines.append(
            f"{r['name']:<26} {r.get('backend', ''):<8} {r.get('mode', r.get('size', '')):<18} "
            f"{r.get('n', ''):<6} {_fmt(r.get('p50_ms'))} {_fmt(r.get('p99_ms'))} "
            f"{(r.get('target') or '-'):<28} {r.get('pass')}"
            + (f"  failed={r['failed']} reloads={r['haproxy_reloads']}"
               if "failed" in r else "")
            + (f"  value={r['value']}{r.get('unit', '')}" if "value" in r else ""))
    for what in report.unmeasured:
        lines.append(f"NOT MEASURED: {what}")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    return f"{v:>8}" if v is not None else f"{'-':>8}"
