"""Issue 11: each host's registry cost stays flat as the fleet grows (both backends).

What a read cost is *counted* (``Registry.reads``: the keys and bytes the server returned),
with 2,000 instances of other nodes written by raw clients: an agent's per-node read (and a
real agent's resyncs, through its /metrics), a filtered watcher's reads, and a watch that
resumes after a cut link without reading again.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, RegistryURL, etcd_watch, open_registry
from discovery.registry.etcd_aio import LoopThread
from discovery.registry.view import ServicesView
from discovery.watcher.core import Watcher
from tests.harness.agent import AgentProcess, wait_registered
from tests.harness.dockerd import ContainerFactory
from tests.harness.fleet import (
    fill_foreign,
    foreign,
    index_paths,
    last_write,
    owner,
    raw_delete,
    read_only,
)
from tests.harness.haproxy import http_get
from tests.harness.raw_clients import raw_put
from tests.harness.registries import no_write_back
from tests.harness.servers import wait_until
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration

TTL = 4.0  # lease TTL / session timeout: every cut in these tests is shorter
FOREIGN = 2000
ME = "node-me"
OpenReg = Callable[[str], Registry]


def mine(n: int, service: str = "web", **kw: object) -> Instance:
    fields: dict[str, object] = dict(service=service, id=f"{ME}:{n:012x}:80", node=ME,
                                     address="127.0.0.1", port=8000 + n, registered_at=1.0)
    fields.update(kw)
    return Instance(**fields)  # type: ignore[arg-type]


@pytest.fixture
def open_reg() -> Iterator[OpenReg]:
    """Opens registries (TTL above); each is closed without revoking when the test ends."""
    with contextlib.ExitStack() as stack:
        def make(url: str) -> Registry:
            reg = open_registry(url, ttl=TTL, timeout=5.0)
            stack.callback(reg.close, revoke=False)
            return reg

        yield make


class Seen:
    """A watch callback that keeps every change, and applies them to a catalog."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.catalog = Catalog()
        self.lock = threading.Lock()

    def __call__(self, change: Change) -> None:
        with self.lock:
            self.changes.append(change)
        self.catalog.apply(change)

    def has(self, key: tuple[str, str]) -> bool:
        return self.catalog.get(key) is not None

    def got(self, kind: str = "put") -> set[tuple[str, str]]:
        with self.lock:
            return {c.key for c in self.changes if c.kind == kind}

    def kinds(self) -> list[str]:
        with self.lock:
            return [c.kind for c in self.changes]


def test_node_snapshot_costs_the_same_whatever_the_fleet(registry_url: str,
                                                         open_reg: OpenReg) -> None:
    """Bytes and keys read by one node's read: identical with 0 and with 2,000 instances of
    other nodes stored, and a small fraction of a whole-registry read."""
    reg = open_reg(registry_url)
    own = [mine(n) for n in range(4)] + [mine(9, service="api")]
    for inst in own:
        reg.register(inst)
    before = reg.reads.counts()
    alone = reg.node_snapshot(ME)
    cost_alone = reg.reads.counts() - before
    assert alone.instances == {i.key: i for i in own}

    fill_foreign(registry_url, FOREIGN)
    before = reg.reads.counts()
    crowded = reg.node_snapshot(ME)
    cost_crowded = reg.reads.counts() - before
    before = reg.reads.counts()
    full = reg.snapshot()
    cost_full = reg.reads.counts() - before

    assert crowded.instances == alone.instances
    assert len(full.instances) == FOREIGN + len(own)
    assert (cost_crowded.bytes, cost_crowded.keys) == (cost_alone.bytes, cost_alone.keys)
    assert cost_crowded.keys <= 3 * len(own) + 2  # index entries + instances (+ dirs on zk)
    assert cost_crowded.node_reads == 1 and cost_crowded.full_reads == 0
    assert cost_crowded.bytes * 100 < cost_full.bytes, (cost_crowded, cost_full)
    print(f"{RegistryURL.parse(registry_url).scheme}: node read {cost_crowded.bytes} B "
          f"({cost_crowded.keys} keys) for {len(own)} own instances; whole registry "
          f"{cost_full.bytes} B ({cost_full.keys} keys) for {len(full.instances)}")


def test_successor_adopts_and_index_mismatches_are_handled(registry_url: str,
                                                           open_reg: OpenReg) -> None:
    url = RegistryURL.parse(registry_url)
    first = open_reg(registry_url)
    own = [mine(n) for n in range(3)]
    for inst in own:
        first.register(inst)
    assert len(index_paths(registry_url, ME)) == 3

    # A restarted agent (another lease / session) finds its predecessor's entries ...
    second = open_reg(registry_url)
    assert second.node_snapshot(ME).instances == {i.key: i for i in own}
    for inst in own:  # ... and adopts them: both keys are now of its lease / session
        second.register(inst)
    # the predecessor goes: etcd revokes its lease, ZooKeeper ends its session
    first.close(revoke=url.scheme == "etcd")
    assert second.node_snapshot(ME).instances == {i.key: i for i in own}
    assert len(second.snapshot().instances) == 3

    # An index entry whose instance is gone: skipped (deleted by hand; not written back here).
    no_write_back(second)
    raw_delete(registry_url, url.key("web", own[0].id))
    assert set(second.node_snapshot(ME).instances) == {own[1].key, own[2].key}
    second.register(own[0])  # written again: seen again
    assert set(second.node_snapshot(ME).instances) == {i.key for i in own}

    # An instance of its own whose index entry is gone (deleted by hand): its index entry is
    # put back alone, the instance being there as written on its lease / of its session (not
    # written again: a put or set every watcher of its service would receive).
    # Two at once: both put back.
    gone, also = (f"{url.prefix}/nodes/{ME}/web/{i.id}" for i in own[1:])
    for path in (gone, also):
        raw_delete(registry_url, path)
    written = [last_write(registry_url, url.key("web", i.id)) for i in own[1:]]
    assert set(second.node_snapshot(ME).instances) == {i.key for i in own}
    assert {gone, also} <= index_paths(registry_url, ME)
    assert [last_write(registry_url, url.key("web", i.id)) for i in own[1:]] == written
    for path, one in ((gone, own[1]), (also, own[2])):
        assert owner(registry_url, path) == owner(registry_url, url.key("web", one.id)) != 0
    assert set(second.node_snapshot(ME).instances) == {i.key for i in own}
    if url.scheme == "zk":  # a put-back refused (an ACL on the index) fails no reconcile
        raw_delete(registry_url, gone)
        with read_only(registry_url, gone.rpartition("/")[0]):
            assert set(second.node_snapshot(ME).instances) == {own[0].key, own[2].key}
        second.register(own[1])  # left to the reconcile: written again, its index node too
        assert set(second.node_snapshot(ME).instances) == {i.key for i in own}
    # ... not one another writer changed meanwhile: left to the reconcile, which writes it
    raw_put(registry_url, url.key("web", own[1].id), replace(own[1], port=9999).to_json())
    raw_delete(registry_url, gone)
    assert set(second.node_snapshot(ME).instances) == {own[0].key, own[2].key}
    second.register(own[1])
    assert second.node_snapshot(ME).instances == {i.key: i for i in own}

    # An instance of this node written without an index (by hand, or an older version):
    # not read (documented), while every reader of the services sees it.
    stray = mine(7)
    raw_put(registry_url, url.key("web", stray.id), stray.to_json())
    assert stray.key not in second.node_snapshot(ME).instances
    assert stray.key in second.snapshot().instances

    # Deregistering removes the instance and its index entry.
    second.deregister("web", own[2].id)
    assert f"{url.prefix}/nodes/{ME}/web/{own[2].id}" not in index_paths(registry_url, ME)
    assert own[2].key not in second.snapshot().instances


def test_filtered_snapshot_and_watch_cover_only_their_services(registry_url: str,
                                                               open_reg: OpenReg) -> None:
    fill_foreign(registry_url, FOREIGN)  # svc0..svc19, 100 instances each
    writer, reader = open_reg(registry_url), open_reg(registry_url)
    view = ServicesView(reader, ["svc3", "web"])
    before = reader.reads.counts()
    snap = view.snapshot()
    cost = reader.reads.counts() - before
    assert {k[0] for k in snap.instances} == {"svc3"} and len(snap.instances) == 100
    assert cost.keys <= 2 * 100, cost  # svc3's instances (zk: their names, then their data)

    seen = Seen()
    view.watch(seen, snap.revision)
    before = reader.reads.counts()
    for n in range(40):  # other services: nothing of this reaches the filtered watch
        writer.register(foreign(FOREIGN + n, nodes=7))
    web = mine(1)
    writer.register(web)
    wait_until(lambda: web.key in seen.got(), 10, "the put of web")
    writer.register(foreign(FOREIGN + 3))  # svc3: seen
    wait_until(lambda: ("svc3", foreign(FOREIGN + 3).id) in seen.got(), 10, "svc3's put")
    assert {k[0] for k in seen.got()} == {"web", "svc3"}, seen.got()
    assert "reset" not in seen.kinds()
    cost = reader.reads.counts() - before
    assert cost.keys <= 4 and cost.full_reads == 0, cost  # the two puts (zk: + a re-read)

    # A new routed service (SIGHUP): one reset holding the new set, then its changes. The new
    # watch's own read is the reset: one read (ZooKeeper read it all twice before).
    before = reader.reads.counts()
    view.set_services(["svc3", "web", "svc5"])
    wait_until(lambda: "reset" in seen.kinds(), 10, "the reset with svc5")
    reset = next(c for c in seen.changes if c.kind == "reset")
    assert reset.snapshot is not None
    assert {k[0] for k in reset.snapshot.instances} == {"svc3", "svc5", "web"}
    cost = reader.reads.counts() - before
    assert cost.full_reads == 1 and cost.keys <= 2 * 203, cost  # (zk: names, then data)
    assert seen.has(foreign(5).key)
    writer.deregister("svc5", foreign(5).id)
    wait_until(lambda: not seen.has(foreign(5).key), 10, "svc5's delete")
    assert set(seen.catalog.services()) == {"svc3", "svc5", "web"}


def test_a_watcher_starts_on_one_read(registry_url: str, open_reg: OpenReg) -> None:
    """The watcher's first catalog is its watch's own first read (``FIRST_READ``): one full
    read on both backends. On ZooKeeper it read everything twice before: the snapshot, then
    the read that arms the watches. A change after that read comes as a change."""
    fill_foreign(registry_url, 500)
    writer, reader, once = open_reg(registry_url), open_reg(registry_url), open_reg(registry_url)
    once.snapshot()
    one = once.reads.counts()  # what one read of everything costs
    watcher = Watcher(reader, None)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        assert watcher.wait_ready(15)
        cost = reader.reads.counts()
        assert watcher.catalog.size() == 500
        assert cost.full_reads == 1 and cost.bytes < 1.2 * one.bytes, (cost, one)
        writer.register(mine(1))
        wait_until(lambda: watcher.catalog.get(mine(1).key) is not None, 10, "the put")
        assert (reader.reads.counts() - cost).full_reads == 0
    finally:
        watcher.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_a_watch_from_an_older_revision_reads_once(registry_url: str,
                                                  open_reg: OpenReg) -> None:
    """A watch from a revision the registry has moved past: etcd replays what changed since
    (no read); ZooKeeper cannot tell what changed, and its first read (the one that arms its
    watches) is handed over as the reset: one read (two before, a second for the reset)."""
    fill_foreign(registry_url, 100)
    writer, reader = open_reg(registry_url), open_reg(registry_url)
    writer.register(mine(1))
    snap = reader.snapshot()
    writer.register(mine(2))
    before = reader.reads.counts()
    seen = Seen()
    reader.watch(seen, snap.revision)
    wait_until(lambda: seen.has(mine(2).key), 10, "the put since the snapshot")
    cost = reader.reads.counts() - before
    zk = registry_url.startswith("zk:")
    assert seen.kinds().count("reset") == zk and cost.full_reads == zk, (seen.kinds(), cost)
    if zk:
        assert seen.has(mine(1).key) and seen.catalog.size() == 102


def test_watch_resumes_after_a_cut_without_reading_again(registry_url: str,
                                                         open_reg: OpenReg) -> None:
    """A link cut for less than the TTL: the watches (whole and filtered) resume from the last
    revision / zxid: incremental changes, no reset, no full read."""
    fill_foreign(registry_url, 200)
    writer = open_reg(registry_url)
    parsed = RegistryURL.parse(registry_url)
    proxy = TcpProxy(parsed.hosts[0])
    try:
        reader = open_reg(proxy.url(parsed.scheme, parsed.prefix))
        states: list[bool] = []
        reader.add_state_listener(states.append)
        whole, only = Seen(), Seen()
        snap = reader.snapshot()
        reader.watch(whole, snap.revision)
        reader.watch(only, snap.revision, services=["web"])
        writer.register(mine(1))
        writer.register(mine(3))
        wait_until(lambda: mine(3).key in only.got() and mine(3).key in whole.got(), 10,
                   "the first puts")
        before = reader.reads.counts()
        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the reader to see the link down")
            writer.register(mine(2))
            writer.deregister("web", mine(1).id)
            writer.register(mine(3, weight=5))  # changed data of a watched node
            writer.register(foreign(7))
        wait_until(lambda: mine(2).key in only.got() and mine(1).key in only.got("delete")
                   and only.catalog.get(mine(3).key) == mine(3, weight=5), 15,
                   "the filtered watch to catch up")
        wait_until(lambda: {mine(2).key, foreign(7).key} <= whole.got()
                   and mine(1).key in whole.got("delete"), 15, "the whole watch to catch up")
        cost = reader.reads.counts() - before
        assert "reset" not in whole.kinds() + only.kinds()
        assert cost.full_reads == 0, cost
        # What changed, not the 200 instances; on ZooKeeper also the names in the directories
        # that gained or lost a node meanwhile (svc7's 10, web's 2 for each watch).
        assert cost.keys <= 12 + (14 if parsed.scheme == "zk" else 0), cost
        assert foreign(7).key not in only.got()
    finally:
        proxy.close()


def test_etcd_filtered_watch_resumes_wide_then_narrows(etcd_url: str, open_reg: OpenReg,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After a cut, an etcd watch of k > 1 services resumes with one watcher on the whole
    prefix (one WatchCreate instead of k), filtered here: nothing of another service is
    delivered, nothing twice, nothing read again. NARROW_AFTER later it holds its k watchers
    again: another service's change does not even reach the host."""
    monkeypatch.setattr(etcd_watch, "NARROW_AFTER", (1.5, 2.0))
    writer = open_reg(etcd_url)
    leaving = open_reg(etcd_url)  # a host whose lease goes while the watch is wide
    parsed = RegistryURL.parse(etcd_url)
    proxy = TcpProxy(parsed.hosts[0])
    try:
        reader = open_reg(proxy.url(parsed.scheme, parsed.prefix) + "?spread=0.5")
        states: list[bool] = []
        reader.add_state_listener(states.append)
        seen = Seen()
        snap = reader.snapshot(["web", "svc3"])
        watch = reader.watch(seen, snap.revision, services=["web", "svc3"])
        assert isinstance(watch, etcd_watch.EtcdWatch)
        writer.register(mine(1))
        for n in (8, 9):
            leaving.register(mine(n))
        wait_until(lambda: {mine(n).key for n in (1, 8, 9)} <= seen.got(), 10, "the puts")
        assert not watch.wide
        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the reader to see the link down")
            writer.register(mine(2))
            writer.register(foreign(7))  # svc7: not followed
            writer.register(foreign(3))  # svc3
        wait_until(lambda: {mine(2).key, foreign(3).key} <= seen.got(), 15, "the resume")
        assert watch.wide
        leaving.close(revoke=True)  # both of its instances go in one revision: both delivered
        wait_until(lambda: {mine(8).key, mine(9).key} <= seen.got("delete"), 10,
                   "both deletes of one revision while wide")
        before = reader.reads.counts()
        writer.register(foreign(27))  # svc7 again: reaches the wide watch, is dropped
        writer.register(mine(4))
        wait_until(lambda: mine(4).key in seen.got(), 10, "a put while wide")
        assert (reader.reads.counts() - before).keys == 2
        wait_until(lambda: not watch.wide, 10, "the watch back to its k watchers")
        before = reader.reads.counts()
        writer.register(foreign(47))  # svc7: etcd no longer sends it
        writer.register(mine(5))
        wait_until(lambda: mine(5).key in seen.got(), 10, "a put after narrowing")
        cost = reader.reads.counts() - before
        assert cost.keys == 1 and cost.full_reads == 0, cost
        puts = [c.key for c in seen.changes if c.kind == "put"]
        assert sorted(puts) == sorted({mine(n).key for n in (1, 2, 4, 5, 8, 9)}
                                      | {foreign(3).key})
        assert "reset" not in seen.kinds()
    finally:
        proxy.close()


def test_etcd_registries_of_one_process_share_one_watch_loop(etcd_url: str) -> None:
    """Many etcd registries in one process (the fleet bench's simulated hosts) given one
    ``LoopThread`` keep their leases and follow the registry on it: a watch, a keepalive
    stream or a lease's keeper costs no thread of its own, one change reaches every one, and
    a stopped watch delivers nothing more while the others go on."""
    loop = LoopThread("test-watch-loop")
    regs: list[Registry] = []
    try:
        writer = open_registry(etcd_url, ttl=TTL)
        regs.append(writer)
        followers = [open_registry(etcd_url, ttl=TTL, loop=loop) for _ in range(30)]
        regs += followers
        seen = [Seen() for _ in followers]
        writer.register(mine(0))  # its lease's keeper and stream threads: before the count
        snap = writer.snapshot()
        threads = threading.active_count()
        watches = [reg.watch(s, snap.revision) for reg, s in zip(followers, seen, strict=True)]
        for n, reg in enumerate(followers):
            reg.register(mine(100 + n))
        writer.register(mine(1))
        wait_until(lambda: all(s.has(mine(1).key) for s in seen), 10, "every follower")
        # no thread a registry (threaded gRPC: a reader and a request thread a stream, and a
        # channel thread; the lease: a keeper thread); whatever their count: gRPC's asyncio
        # poller, the executors of the shared loop and of the writer's own (4 threads each)
        assert threading.active_count() - threads <= 1 + 4 + 4
        watches[0].stop()
        writer.register(mine(2))
        wait_until(lambda: all(s.has(mine(2).key) for s in seen[1:]), 10, "the others")
        assert not seen[0].has(mine(2).key)
    finally:
        for reg in regs:
            reg.close(revoke=False)
        loop.close()


def test_agent_resync_reads_only_its_node(registry_url: str, open_reg: OpenReg,
                                          containers: ContainerFactory,
                                          start_agent: Callable[..., AgentProcess]) -> None:
    """A real agent (``--resync 1``) next to 2,000 instances of other nodes: the bytes it
    reads per resync (``discovery_registry_read_bytes_total``) are its own instance's, not
    the registry's."""
    fill_foreign(registry_url, FOREIGN)
    whole = open_reg(registry_url)
    before = whole.reads.counts()
    whole.snapshot()
    full_bytes = (whole.reads.counts() - before).bytes  # what each resync read before
    http, app = free_port(), free_port()
    web = f"s{uuid.uuid4().hex[:10]}"
    agent = start_agent(registry_url, None, "--resync", "1", "--http", f"127.0.0.1:{http}")
    containers(name=f"{web}-1", port=app, labels={
        "discovery.service": web, "discovery.port": str(app), "discovery.check.interval": "200ms"})
    wait_registered(registry_url, web)
    before = whole.reads.counts()
    whole.node_snapshot(agent.node)
    one_read = (whole.reads.counts() - before).bytes  # what a resync reads now

    def resyncs() -> int:
        return agent.log().count("reconcile done")

    def read_bytes() -> float:
        status, text = http_get(http, "/metrics")
        assert status == 200
        found = re.search(r"^discovery_registry_read_bytes_total (\S+)$", text, re.M)
        assert found, text[-2000:]
        return float(found.group(1))

    wait_for(lambda: resyncs() >= 1, 20, message="a first resync")
    start_bytes, start_count = read_bytes(), resyncs()
    wait_for(lambda: resyncs() >= start_count + 3, 20, message="three more resyncs")
    end_bytes, end_count = read_bytes(), resyncs()
    per_resync = (end_bytes - start_bytes) / (end_count - start_count)
    print(f"{RegistryURL.parse(registry_url).scheme}: agent read {per_resync:.0f} B per resync "
          f"(1 own instance, {one_read} B a node read); a whole-registry read is {full_bytes} "
          f"B ({FOREIGN + 1} instances)")
    assert 0 < per_resync < 3 * one_read, (per_resync, one_read)
    assert per_resync * 100 < full_bytes
