"""``discovery watch`` as a real process with its own HAProxy, and helpers to drive requests."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from discovery.watcher.haproxy import HAProxyMaster
from tests.harness.agent import DiscoveryProcess
from tests.harness.haproxy import http_get
from tests.harness.util import wait_for


class WatcherProcess(DiscoveryProcess):
    def __init__(self, registry: str, services: dict[str, int], log_dir: Path,
                 *extra: str) -> None:
        # UNIX socket paths are limited to 107 bytes: a short state dir of its own.
        self.state_dir = Path(tempfile.mkdtemp(prefix="dw-", dir="/tmp"))
        self.services = services
        args = ["watch", "--registry", registry, "--state-dir", str(self.state_dir)]
        for name, port in services.items():
            args += ["--service", f"{name}:{port}"]
        super().__init__([*args, *extra], "watcher", log_dir)

    @property
    def config_path(self) -> Path:
        return self.state_dir / "haproxy.cfg"

    def config_text(self) -> str:
        return self.config_path.read_text() if self.config_path.exists() else ""

    def reload_count(self) -> int:
        return HAProxyMaster(str(self.state_dir / "master.sock")).reload_count()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.alive, f"watcher exited:\n{self.log()[-3000:]}"
            return (self.state_dir / "admin.sock").exists() and bool(self.config_text())

        wait_for(ready, timeout, message="the watcher's HAProxy to start")

    def cleanup(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)


def spread(port: int, n: int = 20) -> Counter[str]:
    """Send ``n`` requests through HAProxy on ``port``; count answers by body ('!<code>' for
    a non-200 answer, '!err' for a failed connection)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        try:
            status, body = http_get(port)
            seen[body.strip() if status == 200 else f"!{status}"] += 1
        except OSError:
            seen["!err"] += 1
    return seen


@pytest.fixture
def start_watcher(agents: list[DiscoveryProcess], tmp_path: Path
                  ) -> Iterator[Callable[..., WatcherProcess]]:
    """``start_watcher(url, {"web": port}, *extra_args)`` → a ready WatcherProcess."""
    started: list[WatcherProcess] = []

    def start(url: str, services: dict[str, int], *extra: str, ready: bool = True
              ) -> WatcherProcess:
        proc = WatcherProcess(url, services, tmp_path, *extra).start()
        agents.append(proc)  # stopped (SIGTERM) and its log shown on failure, like agents
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.terminate()
        proc.cleanup()
