"""A real Prometheus (the Debian package, /usr/bin/prometheus) on loopback, for interop tests.

Started with a config file the test writes, its own ``--storage.tsdb.path`` under the test's
tmp dir and a free port; stopped by its own pid. :meth:`Prometheus.targets` reads
``/api/v1/targets`` (the discovered labels of every active target of a job).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.util import free_port, wait_for

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, config: str, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.config_path = base / "prometheus.yml"
        self.config_path.write_text(config)
        self.log_path = base / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Prometheus:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS_BIN, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.base / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=debug"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._ready, timeout, interval=0.1, message="Prometheus ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited {self.proc.returncode}:\n{self.log()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
            return bool(r.status == 200)

    def targets(self, job: str) -> list[dict[str, Any]]:
        """The active targets of ``job``: each one's ``discoveredLabels`` (``__address__`` and
        every ``__meta_*``) merged with its final ``labels``."""
        url = f"http://127.0.0.1:{self.port}/api/v1/targets?state=active"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.load(resp)
        return [{**t["discoveredLabels"], **t["labels"]} for t in data["data"]["activeTargets"]
                if t["scrapePool"] == job]

    def addresses(self, job: str) -> set[str]:
        return {t["__address__"] for t in self.targets(job)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
