"""One etcd registry, one connection (issue 11: a fleet's connections to its members grow
with its hosts, not twice as fast): its calls, its watch stream and its lease's keepalive
stream share one connection to one member, and leave a member that hangs together (a call
timed out there: the watch stream, which nothing else ends there, moves with it).

Connections are counted in the kernel's tables, matched to this process's sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, etcd_aio, open_registry
from discovery.registry.etcd import EtcdRegistry
from discovery.registry.etcd_aio import chosen
from tests.harness.servers import ServerCluster, unique_prefix, wait_until

pytestmark = pytest.mark.integration

TTL = 3.0  # a renewal every second; a call's timeout max(1 s, TTL / 3)


def instance(n: int) -> Instance:
    return Instance(service="web", id=f"node-c:{n:012x}:80", node="node-c",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


def follow(reg: Registry) -> Catalog:
    """A catalog that ``reg``'s watch keeps up to date from now on."""
    catalog = Catalog()

    def seen(change: Change) -> None:
        catalog.apply(change)

    reg.watch(seen, reg.snapshot().revision)
    return catalog


def connections_to(port: int) -> set[str]:
    """This process's established TCP connections to ``port``, by socket inode (from /proc:
    its sockets, matched in the kernel's connection tables)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" \
                    and cols[9] in inodes:
                found.add(cols[9])
    return found


@pytest.fixture
def own_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels of equal target and options share a process's connections: the registries
    of a test get options of their own, as each simulated host's in the fleet bench."""
    monkeypatch.setattr(etcd_aio, "GRPC_OPTIONS", [
        *etcd_aio.GRPC_OPTIONS, ("grpc.primary_user_agent", f"test-{uuid.uuid4()}")])


def test_an_etcd_registry_holds_one_connection_to_its_member(
        etcd_single: ServerCluster, own_options: None) -> None:
    """Calls (lease grant, writes, reads), the watch stream and the lease's keepalive stream
    of one registry share one connection to the member: the calls run on the registry's
    asyncio channel, as the streams do (gRPC shares no connection between its threaded and
    asyncio channels: it was two a host)."""
    etcd_single.ensure_running()
    port = etcd_single.address(0)[1]
    before = connections_to(port)
    reg = open_registry(etcd_single.url(unique_prefix()), ttl=TTL)
    try:
        reg.register(instance(0))
        catalog = follow(reg)
        reg.register(instance(1))
        wait_until(lambda: catalog.get(instance(1).key) is not None, 10, "the watch")
        assert instance(0).key in reg.node_snapshot(instance(0).node).instances
        assert len(connections_to(port) - before) == 1
    finally:
        reg.close()


@pytest.fixture
def on_a_follower(etcd_cluster3: ServerCluster, own_options: None) -> Iterator[EtcdRegistry]:
    """A registry whose calls happen to go to a follower (pyetcd picks a member at random):
    pausing a follower elects no one, so its watch streams live on."""
    etcd_cluster3.ensure_running()
    leader = etcd_cluster3.wait_leader()
    url = etcd_cluster3.url(unique_prefix())
    for _ in range(30):
        reg = open_registry(url, ttl=TTL)
        assert isinstance(reg, EtcdRegistry)
        if not chosen(reg.client).netloc.endswith(f":{etcd_cluster3.address(leader)[1]}"):
            break
        reg.close()
    else:
        raise AssertionError("30 registries, each on the leader")
    yield reg
    reg.close()


def test_a_member_that_hangs_is_left_by_the_calls_and_the_streams_together(
        etcd_cluster3: ServerCluster, on_a_follower: EtcdRegistry) -> None:
    """SIGSTOP of the member a registry uses (it takes connections and answers nothing, as in
    a long disk stall): a call made then gets no answer (1 s) and goes to another member, and
    the watch stream and the keepalive stream follow it at once. The watch delivers what is
    registered while the member is still paused, and once it runs again the registry holds
    one connection, to the other member. Before, nothing ended a watch stream on a paused
    member (nor did gRPC's keepalive: 40 s in ``bench/faults.py``): the catalog stood still
    for as long as it hung, and the calls and the keepalive stream held a second connection
    meanwhile."""
    reg = on_a_follower
    ports = [etcd_cluster3.address(m)[1] for m in range(3)]
    before = [connections_to(p) for p in ports]

    def held() -> list[int]:
        return [len(connections_to(p) - b) for p, b in zip(ports, before, strict=True)]

    reg.register(instance(0))
    catalog = follow(reg)
    reg.register(instance(1))
    wait_until(lambda: catalog.get(instance(1).key) is not None, 10, "the watch")
    home = next(m for m in range(3) if chosen(reg.client).netloc.endswith(f":{ports[m]}"))
    assert held() == [int(m == home) for m in range(3)]
    proc = etcd_cluster3.procs[home].popen
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        reg.register(instance(2))  # no answer on the paused member, then another one's

        def moved() -> list[int]:  # where the calls and both streams are now
            used = reg.members_in_use()
            if any(w.endpoint is None for w in reg._watches if not w._stopped.is_set()):
                return []  # the watch between two streams
            return [m for m in range(3) if used == {f"127.0.0.1:{ports[m]}"} and m != home]

        [other] = wait_until(moved, 5, "the calls and the streams on another member")
        reg.register(instance(3))
        wait_until(lambda: catalog.get(instance(3).key) is not None, 5,
                   "the watch, on another member, while the member is paused")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert catalog.get(instance(2).key) is not None
    # the channel to the paused member is closed (by the keeper's next round), and its
    # connection with it: once nothing holds the channel (a kept error held a call's frames)
    wait_until(lambda: held() == [int(m == other) for m in range(3)],
               10, "one connection, to the other member")
    reg.node_snapshot(instance(0).node)  # the calls go on, as an agent's reconciles do
    reg.register(instance(4))
    wait_until(lambda: catalog.get(instance(4).key) is not None, 10, "the watch, after")
    assert held() == [int(m == other) for m in range(3)]
