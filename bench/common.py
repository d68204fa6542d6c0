"""What every benchmark shares: statistics and the raw result file.

Scripts in this folder import it directly (``from common import ...``). Each benchmark writes
its raw result with :func:`write_result` to ``bench/results/<bench>-<backend>.json``; the tables
in ``docs/benchmarks.md`` are generated from those files (``scripts/gen_benchmarks.py``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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
    }


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
