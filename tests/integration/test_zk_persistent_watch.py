"""Issue 11: what a ZooKeeper host costs the ensemble does not grow with the fleet, through the
two ZooKeeper 3.6+ requests kazoo has no API for.

With ZooKeeper 3.6+ a watch is one persistent recursive watch (``zk_persistent``): the
server holds one watch per follower, not one per node it read, and a new or removed instance
costs one read of that node, not a listing of its service's directory. A server without
``AddWatch`` (older than 3.6, made here by sending an opcode the real server does not know)
drops the connection; the follower goes on with one-shot watches. A 3.6+ server whose watch
manager has no persistent watches (a real ZooKeeper started with ``WatchManagerOptimized``)
answers ``MARSHALLINGERROR`` and keeps the connection; the follower goes on the same way.

A read of many nodes (an agent's reconcile reads its node's index: the services it has
instances in, their ids, the instances; a snapshot reads the followed services) sends each
level as one ``multiRead`` of at most 200 paths (``zk_multi``), counted here as the requests
the registry's kazoo client sends. Without ``multiRead`` (the same unknown-opcode trick) it is
read one path per request, with the same result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from discovery.registry import Change, Registry, RegistryURL, open_registry, zk_multi, zk_persistent
from tests.harness.fleet import fill_foreign, foreign
from tests.harness.raw_clients import expire_zk_session
from tests.harness.servers import ZK_TEST_JVM, ServerCluster, ZkEnsemble, unique_prefix, wait_until
from tests.harness.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def watched(zk: ServerCluster, prefix: str) -> set[str]:
    """The paths below ``prefix`` the server holds a watch on (``wchp``)."""
    lines = zk.four_letter(0, "wchp").splitlines()
    return {line for line in lines if line.startswith(prefix + "/")}


def test_one_watch_and_one_read_per_change(zk: ServerCluster, regs: list[Registry]) -> None:
    url = zk.url(unique_prefix())
    root = RegistryURL.parse(url).services_root
    fill_foreign(url, 2000)  # svc0..svc19, 100 instances each
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    seen: list[Change] = []
    watch = reader.watch(seen.append, reader.snapshot().revision)
    assert watched(zk, RegistryURL.parse(url).prefix) == {root}  # not 2,020 paths

    before = reader.reads.counts()
    added, gone = foreign(2003), foreign(5)  # svc3 gains one, svc5 loses one
    writer.register(added)
    writer.deregister(*gone.key)
    wait_until(lambda: {(c.kind, c.key) for c in seen} >= {("put", added.key),
                                                          ("delete", gone.key)},
               10, "the put and the delete")
    cost = reader.reads.counts() - before
    assert cost.keys == 1 and cost.bytes < 1000, cost  # the new node, not svc3's 101 names

    watch.stop()  # left: the writer's watch of its own node (it follows no service: zk_own)
    wait_until(lambda: watched(zk, RegistryURL.parse(url).prefix) == {
        RegistryURL.parse(url).key(*added.key)}, 5, "the server to drop the watch")


def put_and_delete_follow(url: str, regs: list[Registry],
                          armed: Callable[[], bool] = lambda: True) -> None:
    """Of 40 instances, a writer adds one and removes one: a reader's watch (once ``armed``)
    gets a put and a delete, no reset."""
    fill_foreign(url, 40)
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    seen: list[Change] = []
    reader.watch(seen.append, reader.snapshot().revision)
    wait_until(armed, 10, "the watches armed")
    added, gone = foreign(43), foreign(7)
    writer.register(added)
    writer.deregister(*gone.key)
    wait_until(lambda: {(c.kind, c.key) for c in seen} >= {("put", added.key),
                                                          ("delete", gone.key)},
               10, "the put and the delete")
    assert "reset" not in [c.kind for c in seen]


def test_without_addwatch_one_shot_watches_follow(zk: ServerCluster, regs: list[Registry],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zk_persistent.AddWatch, "type", 250)  # no such opcode: UNIMPLEMENTED
    url = zk.url(unique_prefix())
    prefix = RegistryURL.parse(url).prefix
    put_and_delete_follow(url, regs, lambda: len(watched(zk, prefix)) >= 40)  # one a node


@pytest.fixture
def zk_bitset_watches(tmp_path: Path) -> Iterator[ServerCluster]:
    """A real ZooKeeper whose watch manager keeps watches as bit sets (9 x less memory a
    watch) and has no persistent ones."""
    manager = "-Dzookeeper.watchManagerName=org.apache.zookeeper.server.watch.WatchManagerOptimized"
    ensemble = ZkEnsemble(1, tmp_path / "zk", (*ZK_TEST_JVM, manager))
    try:
        ensemble.start()
        yield ensemble
    finally:
        ensemble.stop()


def test_a_server_without_persistent_watches_is_followed_with_one_shot_ones(
        zk_bitset_watches: ServerCluster, regs: list[Registry],
        caplog: pytest.LogCaptureFixture) -> None:
    put_and_delete_follow(zk_bitset_watches.url(unique_prefix()), regs)  # at once
    assert "re-reading everything" not in caplog.text  # it did: every second, and no change
    assert "offers no persistent watches (MarshallingError" in caplog.text


def test_after_a_reconnect_the_persistent_watch_goes_on(zk: ServerCluster,
                                                        regs: list[Registry],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut link: the watch re-adds its persistent watch (SetWatches2) with the catch-up;
    the catch-up's one-shot watches fire once, so the second change of a node after the cut
    reaches the watch only through the persistent one. Those one-shot watches stay on the
    server until their node or directory changes; when it does after the catch-up, the
    persistent watch has told of it already: one read a change, not one more for the node
    (its data watch) or a listing of its directory (its child watch). What changed during
    the cut is read once too: the persistent watch reads a node whose catch-up event it sees,
    so the one-shot watch's event only lists directories."""
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    fill_foreign(url, 20)
    writer = open_registry(url, ttl=5)
    node = foreign(3)
    writer.register(node)  # taken over (a delete and a create): from now on one event a change
    proxy = TcpProxy(parsed.hosts[0])
    try:
        reader = open_registry(proxy.url("zk", parsed.prefix), ttl=5)
        regs += [writer, reader]
        states: list[bool] = []
        reader.add_state_listener(states.append)
        seen: list[Change] = []
        reader.watch(seen.append, reader.snapshot().revision)
        sent = requests_of(reader, monkeypatch)
        changed, gone = replace(foreign(4), weight=9), foreign(6)
        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the reader to see the link down")
            writer.register(changed)
            writer.deregister(*gone.key)
        wait_until(lambda: states[-1:] == [True], 10, "the reader to reconnect")
        wait_until(lambda: ("put", changed.key) in {(c.kind, c.key) for c in seen}
                   and ("delete", gone.key) in {(c.kind, c.key) for c in seen}, 10,
                   "the catch-up")
        wait_until(lambda: len(watched(zk, parsed.prefix)) >= 19, 10,  # + the persistent one
                   "the catch-up watches of the 18 instances the cut left alone")
        wait_until(lambda: sent.count("GetChildren") >= 2, 10, "svc4's and svc6's listings")
        # SetWatches, the two nodes (together or apart), the listings of their directories
        reads = [r for r in sent if r in ("GetData", "MultiRead")]
        assert sent[0] == "SetWatches" and reads in (["MultiRead"], ["GetData"] * 2), sent
        assert sorted(sent[1:]) == sorted(reads + ["GetChildren"] * 2), sent
        del sent[:]
        for weight in (2, 3, 4):
            writer.register(replace(node, weight=weight))
            wait_until(lambda w=weight: any(c.instance is not None and c.instance.weight == w
                                            for c in seen), 10, f"weight {weight}")
        for added in (foreign(23), foreign(25)):  # into svc3's and svc5's directories
            writer.register(added)
            wait_until(lambda k=added.key: ("put", k) in {(c.kind, c.key) for c in seen}, 10,
                       f"{added.id}'s put")
        assert "reset" not in [c.kind for c in seen]
        # one read a change (before: 9 requests for these 5, 2 of them listings)
        assert sent == ["GetData"] * 5, sent
    finally:
        proxy.close()


NODE = "f3"  # with 2,000 instances on 10 nodes: 200 instances, in svc3 and svc13


def requests_of(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the requests ``reg``'s kazoo client sends from now on, in order (what
    its connection writes: kazoo's calls and the connection thread's own reads), but its
    session's own: connecting and pings."""
    conn = reg.client._connection  # type: ignore[attr-defined]
    sent: list[str] = []
    real = conn._submit

    def submit(request: object, *args: object, **kw: object) -> object:
        if type(request).__name__ not in ("Connect", "Ping"):
            sent.append(type(request).__name__)
        return real(request, *args, **kw)

    monkeypatch.setattr(conn, "_submit", submit)
    return sent


def test_node_read_and_snapshot_are_a_few_requests(zk: ServerCluster, regs: list[Registry],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = zk.url(unique_prefix())
    made = fill_foreign(url, 2000, nodes=10)
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    sent = requests_of(reg, monkeypatch)

    node = reg.node_snapshot(NODE)
    assert set(node.instances) == {i.key for i in made if i.node == NODE}
    assert len(node.instances) == 200
    # the index root; its 2 service dirs in one request; the 200 instances in one
    assert sent == ["GetChildren", "MultiRead", "MultiRead"]

    sent.clear()
    full = reg.snapshot()
    assert set(full.instances) == {i.key for i in made}
    # the services; their 20 dirs in one request; 2,000 instances, 200 a request
    assert sent == ["GetChildren"] + ["MultiRead"] * 11


def test_without_multiread_one_request_per_path(zk: ServerCluster, regs: list[Registry],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zk_multi.MultiRead, "type", 250)  # no such opcode: UNIMPLEMENTED
    url = zk.url(unique_prefix())
    made = fill_foreign(url, 200, nodes=10)  # f3: 20 instances in svc3 and svc13
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    expected = {i.key for i in made if i.node == NODE}
    assert set(reg.node_snapshot(NODE).instances) == expected  # the server refused once
    assert reg._many.supported is False  # type: ignore[attr-defined]

    sent = requests_of(reg, monkeypatch)
    assert set(reg.node_snapshot(NODE).instances) == expected
    assert sent == ["GetChildren"] * 3 + ["GetData"] * 20
    assert set(reg.snapshot().instances) == {i.key for i in made}


def test_a_watch_reads_everything_in_a_few_requests(zk: ServerCluster, regs: list[Registry],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower's full read (at its start, and again after its session expired: a reset)
    reads its instances many a request, not one request each: after an ensemble restart
    every host whose session expired reads all it follows at once."""
    url = zk.url(unique_prefix())
    made = fill_foreign(url, 2000, nodes=10)
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    revision = reg.snapshot().revision  # connected: the watch reads at once
    sent = requests_of(reg, monkeypatch)
    seen: list[Change] = []
    watch = reg.watch(seen.append, revision)
    # the persistent watch; the services; their 20 dirs; 2,000 instances, 200 a request
    expected = ["AddWatch", "GetChildren2"] + ["GetChildren2"] * 20 + ["MultiRead"] * 10
    assert sent == expected

    sent.clear()
    watch.reset()  # what the registry does when its session expired
    wait_until(lambda: [c.kind for c in seen] == ["reset"], 10, "the reset")
    assert set(seen[0].snapshot.instances) == {i.key for i in made}  # type: ignore[union-attr]
    assert sent == expected


def test_an_expired_session_registers_again_in_one_request(
        zk: ServerCluster, regs: list[Registry], monkeypatch: pytest.MonkeyPatch) -> None:
    """After its session expired (its nodes gone with it), a host creates every instance node
    and its index node again in one transaction: one request, where one by one took 24 (an
    ensemble down for longer than the session timeout expires the whole fleet's sessions);
    one more re-arms the watches of its own nodes."""
    url = zk.url(unique_prefix())
    mine = [foreign(n, nodes=1, services=2) for n in range(12)]  # node f0, svc0 and svc1
    reg, other = open_registry(url, ttl=5), open_registry(url)
    regs += [reg, other]
    for inst in mine:
        reg.register(inst)
    client, look = reg.client, other.client  # type: ignore[attr-defined]
    paths = [reg.url.key(*i.key) for i in mine] + [  # type: ignore[attr-defined]
        f"{reg.url.prefix}/nodes/f0/{i.service}/{i.id}" for i in mine]  # type: ignore[attr-defined]
    old = client.client_id[0]
    assert {look.exists(p).ephemeralOwner for p in paths} == {old}
    sent = requests_of(reg, monkeypatch)

    expire_zk_session(client)

    new = client.client_id[0]
    assert new != old

    def owners() -> set[int | None]:
        return {getattr(look.exists(p), "ephemeralOwner", None) for p in paths}

    wait_until(lambda: owners() == {new}, 10, "every node created again by the new session")
    # and (no watch follows them: zk_own) the watches of its own nodes, re-armed in one
    wait_until(lambda: sent == ["Transaction", "SetWatches"], 5, "its own nodes watched")
    assert set(reg.node_snapshot("f0").instances) == {i.key for i in mine}

    # A part whose transaction fails (here: its nodes are there already) is left to claim one
    # by one, and the failed transaction changed nothing.
    before = {p: look.exists(p).version for p in paths}
    claims = reg._claims  # type: ignore[attr-defined]
    assert claims.claim_together(mine) == mine
    assert {p: look.exists(p).version for p in paths} == before


def test_changes_that_come_together_are_read_in_one_request(
        zk: ServerCluster, regs: list[Registry], monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that dies takes its instances with its session: a follower gets one event per
    node at once, and reads the nodes together in a ``multiRead`` (sent by its connection
    thread once it has read the events that came together), not one each, while its worker
    is still busy with an earlier change: the answers wait for it."""
    url = zk.url(unique_prefix())
    dying = [foreign(n, nodes=1, services=2) for n in range(10)]  # node f0, svc0 and svc1
    gate = foreign(11, nodes=2, services=2)  # node f1, svc1
    host, other, reader = (open_registry(url, ttl=5) for _ in range(3))
    regs += [host, other, reader]
    for inst in dying:
        host.register(inst)
    release = threading.Event()
    seen: list[Change] = []

    def follow(change: Change) -> None:
        seen.append(change)
        if change.key == gate.key:
            release.wait(10)  # the worker is busy: what comes meanwhile queues up

    watch = reader.watch(follow, reader.snapshot().revision)
    other.register(gate)
    wait_until(lambda: any(c.key == gate.key for c in seen), 10, "the gate's put")
    sent = requests_of(reader, monkeypatch)
    host.close()  # its session ends: its 10 nodes go at once
    wait_until(lambda: len(watch._queue) == 10, 10, "the 10 answers queued")  # type: ignore[attr-defined]
    release.set()
    wait_until(lambda: {c.key for c in seen if c.kind == "delete"} == {i.key for i in dying},
               10, "the 10 deletes")
    # the events come in a few bursts (what the connection thread finds to read before its
    # socket runs dry: 1-3 mostly, 4 seen once on a loaded machine): a multiRead of each,
    # not 10 reads
    assert "MultiRead" in sent and set(sent) <= {"MultiRead", "GetData"}, sent
    assert len(sent) <= 5, sent
