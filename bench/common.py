"""What every benchmark shares: statistics, the raw result file, progress, signals, reports.

Scripts in this folder import it directly (``from common import ...``); it imports no other
benchmark, so there is no cycle between them (:mod:`procs`, processes and probes, imports it).
Each benchmark writes its raw result with :func:`write_result` to
``bench/results/<bench>-<backend>.json``; the tables in ``docs/benchmarks.md`` are generated
from those files (``scripts/gen_benchmarks.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


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


def say(text: str) -> None:
    """Progress on stderr, prefixed with the running script's name."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"
    print(f"[{name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Interrupted(BaseException):  # like KeyboardInterrupt: not caught as an Exception
    """SIGINT/SIGTERM: unwind through every ``finally`` (which cleans up)."""


class Unmeasured(Exception):
    """A phase could not be measured (a server, process or container did not come up)."""


def install_signal_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; later ones do not cut the cleanup.
    Installed explicitly, so Ctrl-C works even when the shell started us with SIGINT ignored.
    Returns the handlers they replace."""
    fired = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            say(f"signal {signum}: still cleaning up, please wait")
            return
        fired = True
        raise Interrupted(signal.Signals(signum).name)

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """:func:`install_signal_handlers` for the ``with`` block, the old handlers after it."""
    old = install_signal_handlers()
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


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

    def not_measured(self, what: str, exc: object) -> int:
        """Say and keep that ``what`` could not be measured, and why; 2, the bench's status
        for it."""
        say(f"{what}: NOT MEASURED: {exc}")
        self.unmeasured.append(f"{what}: {str(exc).splitlines()[0][:200]}")
        return 2

    def status(self, code: int) -> int:
        """The bench's exit status: ``code`` if not 0 (2: something not measured), else 1 when
        a row missed its target, else 0."""
        return code or (1 if self.failed() else 0)

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



def measured(bench: str, backend: str, what: str, run: Callable[[Path, Report], Any], *,
             save: bool = True) -> int:
    """``run(work, report)`` in a new work folder, what it returns saved as the raw result
    ``<bench>-<backend>`` (unless not ``save``): the bench's exit status (130 on Ctrl-C, 2 when
    ``what`` could not be measured: the work folder is then kept, for its logs)."""
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix=f"discovery-{bench}-"))
    report = Report()
    mark = report.mark()
    code = 0
    try:
        samples = run(work, report)
        if save:
            report.save(bench, backend, mark, samples)
    except Interrupted:
        say("interrupted: cleaned up")
        return 130
    except Exception as exc:
        code = report.not_measured(what, exc)
    keep_or_remove(work, code == 2)
    return report.status(code)


def keep_or_remove(work: Path, keep: bool) -> None:
    """A bench's work dir: kept (and named) when asked or when something went wrong."""
    if keep:
        say(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


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
