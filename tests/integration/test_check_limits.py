"""Checks cannot starve each other (issue 8 §3): the real agent, dockerd and etcd.

A hostile container offers 9 ports whose HTTP checks never answer (every connection is
accepted and then left hanging, with the longest timeout a label may ask for). It may hold at
most ``PER_CONTAINER_CHECKS`` of the agent's 8 shared check workers, so an unrelated container
started meanwhile registers as fast as on an idle agent.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from discovery.agent.spec import PER_CONTAINER_CHECKS
from tests.harness.agent import AgentProcess, wait_registered
from tests.harness.dockerd import ContainerFactory
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration

#: From ``docker start`` returning to the instance in the registry, on an idle agent it is
#: ~0.1-0.3 s (event, inspect, one TCP check, one registry write).
NORMAL = 2.0


def socket_inode(port: int, peer_port: int) -> str | None:
    """The inode of the loopback TCP socket from local ``port`` to ``peer_port`` (from
    /proc/net/tcp). Both ends count: an ephemeral port is reused towards other peers, and such
    a socket (say, one in TIME_WAIT, whose inode is 0) may be listed first."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{peer_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return fields[9]
    return None


def owned_by(pid: int, inode: str | None) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return inode is not None and any(
            os.readlink(fd_dir / fd) == f"socket:[{inode}]" for fd in os.listdir(fd_dir))
    except OSError:
        return False


class Tarpit:
    """Loopback listeners that accept every connection and never answer it. Counts the
    connections of process ``pid`` open now and at most (a check run holds one until it gives
    up); other agents sharing this dockerd probe the hostile container too, uncounted."""

    pid = 0

    def __init__(self, count: int) -> None:
        self._listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        self.ports = [int(s.getsockname()[1]) for s in self._listeners]
        self._sel = selectors.DefaultSelector()
        for s in self._listeners:
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ, "listen")
        self._lock = threading.Lock()
        self.open = self.max_open = self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Tarpit:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()

    @staticmethod
    def _receive(sock: socket.socket) -> bytes:
        """What arrived, or nothing once the peer has closed or reset the connection."""
        try:
            return sock.recv(4096)
        except OSError:
            return b""

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if key.data == "listen":
                    try:
                        conn, peer = sock.accept()
                    except OSError:  # the connection went away before the accept
                        continue
                    conn.setblocking(False)
                    mine = owned_by(self.pid, socket_inode(peer[1], sock.getsockname()[1]))
                    self._sel.register(conn, selectors.EVENT_READ, mine)
                    if not mine:
                        continue
                    with self._lock:
                        self.open += 1
                        self.accepted += 1
                        self.max_open = max(self.max_open, self.open)
                elif not self._receive(sock):  # the check gave up: the peer closed
                    self._sel.unregister(sock)
                    sock.close()
                    if not key.data:
                        continue
                    with self._lock:
                        self.open -= 1


@pytest.mark.parametrize("registry_url", ["etcd"], indirect=True)
def test_hostile_container_cannot_delay_another(
    registry_url: str, containers: ContainerFactory, start_agent: Callable[..., AgentProcess]
) -> None:
    hostile, good = f"h{uuid.uuid4().hex[:10]}", f"g{uuid.uuid4().hex[:10]}"
    with Tarpit(9) as tarpit:
        agent = start_agent(registry_url)
        assert agent.proc is not None
        tarpit.pid = agent.proc.pid
        hostile_labels = {f"discovery.{p}.service": hostile for p in tarpit.ports}
        hostile_labels.update({"discovery.check": "http", "discovery.check.interval": "60s",
                               "discovery.check.timeout": "60s"})
        containers(name=f"{hostile}-1", labels=hostile_labels)  # host network: ports reachable
        wait_for(lambda: tarpit.open >= PER_CONTAINER_CHECKS, timeout=20,
                 message="the hostile container's checks hanging")

        port = free_port()
        containers(name=f"{good}-1", port=port, labels={
            "discovery.service": good, "discovery.port": str(port),
            "discovery.check.interval": "200ms"})
        started = time.monotonic()
        wait_registered(registry_url, good, timeout=NORMAL)
        took = time.monotonic() - started
        print(f"unrelated container registered {took:.3f} s after its start; "
              f"hostile checks open {tarpit.open}, at most {tarpit.max_open}")
        assert tarpit.max_open == PER_CONTAINER_CHECKS  # 2 of the 8 workers, never more
        assert tarpit.accepted == PER_CONTAINER_CHECKS  # the others wait their turn
        assert agent.alive
        stopping = time.monotonic()  # its checks still hang: SIGTERM ends it all the same
        assert agent.terminate() == 0  # (before: 60 s, the checks' timeout; killed at 15)
        assert time.monotonic() - stopping < 3
