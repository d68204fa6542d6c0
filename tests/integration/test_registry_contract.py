"""One contract for every registry backend, against real etcd and ZooKeeper servers.

``registry_url`` runs each test on single-node etcd and ZooKeeper, ``cluster_url`` on
3-member ones. Links are broken with a TCP proxy (tests.harness.tcp_proxy.TcpProxy) or by
SIGKILLing members; nothing is mocked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from discovery.model import Instance
from discovery.registry import Change, Registry, RegistryURL, Snapshot, open_registry
from tests.harness.raw_clients import raw_put
from tests.harness.servers import ServerCluster, unique_prefix, wait_until
from tests.harness.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

TTL = 2.0  # lease TTL / session timeout of the registries under test

OpenReg = Callable[..., Registry]


def inst(n: int = 1, service: str = "web", **kw: object) -> Instance:
    fields: dict[str, object] = dict(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                                     address="127.0.0.1", port=8000 + n, registered_at=1.0)
    fields.update(kw)
    return Instance(**fields)  # type: ignore[arg-type]


@pytest.fixture
def open_reg() -> Iterator[OpenReg]:
    """Opens registries; closes (without revoking) whatever the test left open."""
    made: list[Registry] = []

    def make(url: str, ttl: float = TTL, timeout: float = 3.0) -> Registry:
        reg = open_registry(url, ttl=ttl, timeout=timeout)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close(revoke=False)


class Follower:
    """Applies a watch's changes to a dict, as a consumer would; records them too."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, str], Instance] = {}
        self.changes: list[Change] = []
        self.lock = threading.Lock()

    def __call__(self, change: Change) -> None:
        with self.lock:
            self.changes.append(change)
            if change.kind == "reset":
                assert change.snapshot is not None
                self.state = dict(change.snapshot.instances)
            elif change.kind == "put":
                assert change.instance is not None and change.instance.key == change.key
                self.state[change.key] = change.instance
            else:
                self.state.pop(change.key, None)

    def follow(self, reg: Registry) -> Follower:
        snap = reg.snapshot()
        self.state = dict(snap.instances)
        reg.watch(self, snap.revision)
        return self

    def follow_services(self, reg: Registry, services: list[str]) -> Follower:
        """:meth:`follow`, of ``services`` only."""
        snap = reg.snapshot(services)
        self.state = dict(snap.instances)
        reg.watch(self, snap.revision, services)
        return self

    def wait_state(self, expected: dict[tuple[str, str], Instance], timeout: float = 10) -> None:
        def same() -> bool:
            with self.lock:
                return self.state == expected
        wait_until(same, timeout, f"watch state == {sorted(expected)}")

    def kinds(self) -> list[str]:
        with self.lock:
            return [c.kind for c in self.changes]


def instances(snap: Snapshot) -> dict[tuple[str, str], Instance]:
    return dict(snap.instances)


def proxied(url: str) -> tuple[TcpProxy, str]:
    parsed = RegistryURL.parse(url)
    proxy = TcpProxy(parsed.hosts[0])
    return proxy, proxy.url(parsed.scheme, parsed.prefix)


# -- basics --------------------------------------------------------------------------------


def test_register_snapshot_deregister(registry_url: str, open_reg: OpenReg) -> None:
    reg, other = open_reg(registry_url), open_reg(registry_url)
    assert reg.snapshot().instances == {}
    a, b, c = inst(1), inst(2), inst(3, service="api", tags=("x",), meta={"k": "v"})
    for i in (a, b, c):
        reg.register(i)
    snap = other.snapshot()
    assert instances(snap) == {a.key: a, b.key: b, c.key: c}
    assert snap.revision > 0
    reg.deregister("web", a.id)
    reg.deregister("web", a.id)  # again: not an error
    other.deregister("nosuch", "x")
    assert instances(other.snapshot()) == {b.key: b, c.key: c}


def test_register_overwrites(registry_url: str, open_reg: OpenReg) -> None:
    reg, other = open_reg(registry_url), open_reg(registry_url)
    reg.register(inst(1, weight=10))
    first = other.snapshot()
    reg.register(inst(1, weight=20, tags=("new",)))
    snap = other.snapshot()
    assert [(i.weight, i.tags) for i in snap.instances.values()] == [(20, ("new",))]
    assert snap.revision > first.revision


def test_register_is_fast(registry_url: str, open_reg: OpenReg) -> None:
    reg = open_reg(registry_url)
    reg.register(inst(0))  # the first one may set up the lease / session
    times = []
    for n in range(60):
        t = time.perf_counter()
        reg.register(inst(n % 20, weight=n + 1))
        times.append(time.perf_counter() - t)
    times.sort()
    assert times[int(len(times) * 0.95)] < 0.1, times[-5:]


def test_snapshot_skips_malformed_entry(registry_url: str, open_reg: OpenReg,
                                        caplog: pytest.LogCaptureFixture) -> None:
    reg = open_reg(registry_url)
    good = inst(1)
    reg.register(good)
    url = RegistryURL.parse(registry_url)
    bad_key = url.key("web", "bad-1")
    raw_put(registry_url, bad_key, b"\x00\xff not json")
    raw_put(registry_url, url.key("web", "node-9:000000000009:80"), inst(5).to_json())  # wrong key
    with caplog.at_level(logging.WARNING):
        snap = reg.snapshot()
    assert instances(snap) == {good.key: good}
    assert [r for r in caplog.records if bad_key in r.getMessage()], caplog.text


# -- watch ---------------------------------------------------------------------------------


def test_watch_sees_puts_and_deletes_in_order(registry_url: str, open_reg: OpenReg) -> None:
    writer, reader = open_reg(registry_url), open_reg(registry_url)
    writer.register(inst(1))
    seen = Follower().follow(reader)
    a2, b = inst(1, weight=7), inst(2, service="api")
    steps: list[tuple[Callable[[], None], str, tuple[str, str]]] = [
        (lambda: writer.register(b), "put", b.key),
        (lambda: writer.register(a2), "put", a2.key),
        (lambda: writer.deregister("web", a2.id), "delete", a2.key),
        (lambda: writer.deregister("api", b.id), "delete", b.key),
    ]
    for action, kind, key in steps:
        n = len(seen.changes)
        action()
        wait_until(lambda n=n: len(seen.changes) > n, 10, f"the {kind} of {key}")
    got = [(c.kind, c.key) for c in seen.changes]
    assert got == [(kind, key) for _, kind, key in steps]
    assert seen.changes[1].instance == a2
    revisions = [c.revision for c in seen.changes]
    assert revisions == sorted(revisions) and revisions[0] > 0
    assert seen.state == {}

    # A burst: the watch ends where a fresh snapshot is, nothing lost or stale.
    for n in range(20):
        writer.register(inst(n, service=f"s{n % 3}"))
    for n in range(0, 20, 3):
        writer.deregister(f"s{n % 3}", inst(n).id)
    raw_put(registry_url, RegistryURL.parse(registry_url).key("s1", "garbage"), b"{")
    seen.wait_state(instances(writer.snapshot()))


def test_watch_resumes_after_connection_cut(registry_url: str, open_reg: OpenReg) -> None:
    writer = open_reg(registry_url)
    proxy, via_proxy = proxied(registry_url)
    try:
        reader = open_reg(via_proxy, ttl=4.0)
        states: list[bool] = []
        reader.add_state_listener(states.append)
        writer.register(inst(1))
        seen = Follower().follow(reader)
        writer.register(inst(2))
        seen.wait_state(instances(writer.snapshot()))
        assert states[-1:] == [True]

        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the reader to report the link down")
            writer.register(inst(3))
            writer.deregister("web", inst(1).id)
            writer.register(inst(2, weight=5))
            time.sleep(0.3)  # a deliberate window: the reader retries against a refusing proxy
        seen.wait_state(instances(writer.snapshot()))
        wait_until(lambda: states[-1:] == [True], 10, "the reader to report the link up")
        assert "reset" not in seen.kinds()  # resumed, not re-read (the session/revision is fine)
    finally:
        proxy.close()


def test_watch_from_a_compacted_revision_resets(etcd_single: ServerCluster,
                                                open_reg: OpenReg) -> None:
    import pyetcd

    url = etcd_single.url(unique_prefix())
    reg = open_reg(url)
    reg.register(inst(1))
    old = reg.snapshot().revision
    reg.register(inst(2))
    reg.deregister("web", inst(1).id)
    host, port = RegistryURL.parse(url).hosts[0]
    raw = pyetcd.client(host, port, timeout=5)
    try:
        raw.compact(reg.snapshot().revision)
    finally:
        raw.close()
    seen = Follower()
    reg.watch(seen, old)
    wait_until(lambda: seen.changes, 10, "the reset")
    assert seen.changes[0].kind == "reset"
    assert seen.state == {inst(2).key: inst(2)}
    reg.register(inst(3))  # and it goes on watching
    seen.wait_state({inst(2).key: inst(2), inst(3).key: inst(3)})



def test_etcd_register_when_the_lease_is_gone(etcd_single: ServerCluster,
                                             open_reg: OpenReg) -> None:
    """The first put after our lease vanished grants a new one and re-puts everything owned."""
    import pyetcd

    from discovery.registry.etcd import EtcdRegistry

    url = etcd_single.url(unique_prefix())
    reg, other = open_reg(url, ttl=30), open_reg(url)  # keepalive every 10 s: not in the way
    assert isinstance(reg, EtcdRegistry)
    reg.register(inst(1))
    reg.register(inst(2))
    host, port = RegistryURL.parse(url).hosts[0]
    raw = pyetcd.client(host, port, timeout=5)
    try:
        raw.revoke_lease(reg._lease)
    finally:
        raw.close()
    assert other.snapshot().instances == {}
    reg.register(inst(3))
    assert set(other.snapshot().instances) == {inst(n).key for n in (1, 2, 3)}


# -- 3 members -----------------------------------------------------------------------------


def _connected_member(reg: Registry, cluster: ServerCluster) -> int:
    """Index of the member ``reg`` talks to right now."""
    from discovery.registry.etcd import EtcdRegistry
    from discovery.registry.zk import ZkRegistry

    def port() -> int:
        if isinstance(reg, EtcdRegistry):
            return int(reg.client.endpoint_in_use.netloc.rsplit(":", 1)[1])
        assert isinstance(reg, ZkRegistry)
        return int(reg.client._connection._socket.getpeername()[1])

    ports = [cluster.address(i)[1] for i in range(cluster.size)]
    return int(wait_until(lambda: ports.index(port()) + 1, 10, "a connection")) - 1


def test_cluster_survives_sigkill_of_the_connected_member(
        cluster_url: tuple[ServerCluster, str], open_reg: OpenReg) -> None:
    """SIGKILL (no goodbye) of the member the registry talks to, twice, while it registers:
    no call fails, nothing is lost, and the lease / session outlives the TTL after each."""
    cluster, url = cluster_url
    ttl = 3.0
    reg, reader = open_reg(url, ttl=ttl, timeout=5.0), open_reg(url, timeout=5.0)
    reg.register(inst(0))
    seen = Follower().follow(reader)
    wanted = [inst(n, service=f"s{n % 4}") for n in range(1, 41)]
    done: list[Instance] = []
    errors: list[Exception] = []

    def register_all() -> None:
        for i in wanted:
            try:
                reg.register(i)  # no retries here: that is the registry's job
                done.append(i)
            except Exception as exc:
                errors.append(exc)
            time.sleep(0.02)  # pacing, not waiting: spreads the calls across the failovers

    loop = threading.Thread(target=register_all)
    loop.start()
    killed_at = 0.0
    try:
        for at in (10, 25):  # SIGKILL the member we talk to (the first one back first)
            wait_until(lambda at=at: len(done) + len(errors) >= at, 10, f"{at} registrations")
            if at == 25:
                cluster.ensure_running()
            victim = _connected_member(reg, cluster)
            killed_at = time.monotonic()
            cluster.kill_member(victim)
        loop.join(15)
        assert not loop.is_alive(), f"registering stalled: {len(done)} done"
        assert errors == []
        expected = {i.key: i for i in [inst(0), *wanted]}
        assert instances(reader.snapshot()) == expected
        seen.wait_state(expected)
        # Every read until TTL + 1 s after the last kill still has everything: the keepalive /
        # session moved to a live member (an expired one would have emptied the prefix by then).
        reads: list[bool] = []

        def intact_past_the_ttl() -> bool:
            reads.append(instances(reader.snapshot()) == expected)
            return not reads[-1] or time.monotonic() - killed_at > ttl + 1

        wait_until(intact_past_the_ttl, ttl + 3, "TTL + 1 s after the last kill")
        assert all(reads), "an entry went missing after the SIGKILL"
    finally:
        loop.join(60)
        cluster.ensure_running()
