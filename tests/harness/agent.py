"""Run ``discovery agent`` / ``discovery watch`` as real processes (so tests can SIGKILL,
SIGTERM, SIGHUP and restart them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest

from discovery.model import Instance
from discovery.registry import open_registry
from tests.harness.util import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


class DiscoveryProcess:
    """``python -m discovery --log-level debug <args>``, logging to a file."""

    def __init__(self, args: list[str], name: str, log_dir: Path) -> None:
        self.args, self.name = args, name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        cmd = [sys.executable, "-m", "discovery", "--log-level", "debug", *self.args]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        if not self.alive:
            return None if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class AgentProcess(DiscoveryProcess):
    def __init__(self, registry: str, node: str, log_dir: Path, *extra: str) -> None:
        self.registry, self.node = registry, node
        super().__init__(["agent", "--registry", registry, "--node", node, *extra],
                         f"agent-{node}", log_dir)


def registry_instances(url: str) -> dict[tuple[str, str], Instance]:
    reg = open_registry(url, timeout=3.0)
    try:
        return reg.snapshot().instances
    finally:
        reg.close(revoke=False)


def service_instances(url: str, service: str) -> list[Instance]:
    return [i for i in registry_instances(url).values() if i.service == service]


def wait_registered(
    url: str, service: str, count: int = 1, timeout: float = 20.0
) -> list[Instance]:
    def found() -> list[Instance] | None:
        instances = service_instances(url, service)
        return instances if len(instances) == count else None

    result = wait_for(found, timeout=timeout, interval=0.05,
                      message=f"{count} instance(s) of {service} in {url}")
    assert result is not None  # wait_for returns only a truthy value
    return result


def wait_gone(url: str, service: str, timeout: float) -> None:
    wait_for(lambda: not service_instances(url, service), timeout=timeout, interval=0.02,
             message=f"{service} gone from {url}")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[DiscoveryProcess]]:
    """A list the test appends started processes to; all are stopped at teardown."""
    started: list[DiscoveryProcess] = []
    yield started
    for proc in started:
        proc.terminate()
        # shown by pytest only when the test failed
        print(f"----- {proc.name} log ({proc.log_path}) -----\n{proc.log()[-6000:]}")


@pytest.fixture
def start_agent(agents: list[DiscoveryProcess], tmp_path: Path) -> Callable[..., AgentProcess]:
    """``start_agent(url, node=None, *args)`` → a running AgentProcess, stopped at teardown."""

    def start(url: str, node: str | None = None, *extra: str) -> AgentProcess:
        proc = AgentProcess(url, node or f"n{uuid.uuid4().hex[:8]}", tmp_path, *extra).start()
        agents.append(proc)
        return proc

    return start
