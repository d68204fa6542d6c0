"""An entry a registry owns, deleted or changed by another writer under its live lease or
session, is written back by that registry within its ``spread=`` when one of its watches saw
it (``discovery up``: the agent and the watcher share one registry client); its own
deregister is not undone, its own value is not taken for another writer's, a successor's
adoption is left alone, and a registry with no watch of its own services sees them through
watches of its own keys alone (:mod:`~discovery.registry.zk_own`, ``etcd_own``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pytest
from kazoo.security import make_acl

from discovery.model import Instance, State
from discovery.model.nerve import to_nerve
from discovery.registry import RegistryURL, etcd_watch, zk_watch
from discovery.registry.owned import OWN_LATER
from tests.harness.fleet import (
    close_raw,
    delete_services,
    fill_foreign,
    index_paths,
    last_write,
    raw_client,
)
from tests.harness.registries import no_write_back
from tests.harness.servers import wait_until
from tests.harness.tcp_proxy import TcpProxy
from tests.integration.test_registry_contract import Follower, OpenReg, inst, open_reg

__all__ = ["open_reg"]
pytestmark = pytest.mark.integration

SPREAD = 0.5  # the URL's spread=: each entry is written back after a random wait within it


def test_what_another_writer_deleted_is_written_back_once(registry_url: str,
                                                          open_reg: OpenReg) -> None:
    url_s = f"{registry_url}?spread={SPREAD}"
    agent, other, reader = open_reg(url_s), open_reg(url_s), open_reg(url_s)
    ours = [inst(1), inst(2, service="api"), inst(3)]
    theirs = inst(9, id="node-2:000000000009:80", node="node-2")
    for one in ours:
        agent.register(one)
    other.register(theirs)  # a registry with no watch (an agent alone): its own-key watch
    wait_until(lambda: other._restorer.own.holds, 5, "its own key watched")  # type: ignore
    follower = Follower().follow(agent)
    restorer = agent._restorer  # type: ignore[attr-defined]

    agent.deregister(*ours[2].key)  # our own delete: the watch sees it, nothing is scheduled
    wait_until(lambda: ours[2].key not in follower.state, 10, "our own delete seen")
    assert not restorer._due and restorer.restored == 0

    assert delete_services(url_s) == 3  # ours (2) and theirs
    gone = time.monotonic()
    expected = {i.key: i for i in [*ours[:2], theirs]}
    wait_until(lambda: _same(reader.snapshot().instances, expected), SPREAD + 2.0,
               "the three instances written back, nothing else")
    took = time.monotonic() - gone
    assert took <= SPREAD + 1.0, took
    wait_until(lambda: _same(follower.state, expected), 5, "the watch sees them")
    wait_until(lambda: restorer.restored == 2, 5, "each written back once")

    # a second hand delete, of one instance and its index entry (as a delete of the whole
    # prefix; the index entry first: the instance's delete starts the write-back): both
    # back, the index entry through which a restarted agent finds it too
    url = RegistryURL.parse(url_s)
    one = ours[0]
    index = f"{url.prefix}/nodes/{one.node}/{one.service}/{one.id}"
    client = raw_client(url_s)
    try:
        client.delete(index)
        client.delete(url.key(*one.key))
    finally:
        close_raw(client)
    wait_until(lambda: restorer.restored == 3, SPREAD + 2.0, "written back again")
    wait_until(lambda: index in index_paths(url_s, one.node), 5, "its index entry back")
    assert _same(reader.snapshot().instances, expected)
    assert other._restorer.restored == 1  # type: ignore[attr-defined]

    # the write is conditional: an entry there is not written again (each write reaches
    # every host of a fleet)
    before = last_write(url_s, url.key(*one.key))
    assert agent._restore(one.key, False) == ""  # type: ignore[attr-defined]
    assert last_write(url_s, url.key(*one.key)) == before


def _same(seen: dict[tuple[str, str], Instance], expected: dict[tuple[str, str], Instance]
          ) -> bool:
    """The same instances, apart from write stamps (a write-back stamps what it writes)."""
    return seen.keys() == expected.keys() and all(
        seen[k].same_registration(i) for k, i in expected.items())


@pytest.mark.parametrize("registry_url", ["etcd"], indirect=True)
def test_a_late_write_back_of_what_was_deregistered_is_deleted_if_ours(
        registry_url: str, open_reg: OpenReg) -> None:
    """A write-back whose answer was lost may land after the entry's own deregister; looked
    at again in doubt, the entry is deleted if it is there on this registry's lease, and left
    if another writer's (a successor that adopted it)."""
    agent, other, reader = (open_reg(registry_url, ttl=30), open_reg(registry_url, ttl=30),
                            open_reg(registry_url))
    late, adopted = inst(5), inst(6)
    agent.register(late)
    agent.register(adopted)
    other.register(adopted)  # taken over: now on the other registry's lease
    with agent._lock:  # type: ignore[attr-defined]
        agent._owned.clear()  # type: ignore[attr-defined]  # as a deregister whose delete
    for one in (late, adopted):  # came first, the late write after it
        assert agent._restore(one.key, True) == ""  # type: ignore[attr-defined]
    assert list(reader.snapshot().instances) == [adopted.key]
    url = RegistryURL.parse(registry_url)
    assert index_paths(registry_url, late.node) == {
        f"{url.prefix}/nodes/{adopted.node}/{adopted.service}/{adopted.id}"}


@pytest.mark.parametrize("registry_url, layout", [("etcd", "ours"), ("zk", "ours"),
                                                  ("zk", "nerve")], indirect=["registry_url"])
def test_what_another_writer_changed_is_written_back_and_a_successors_is_not(
        registry_url: str, open_reg: OpenReg, layout: str) -> None:
    """A value of ours changed by hand (drained, weight 0: every host's watcher drains it) is
    written back within ``spread`` + 1 s, once, with no loop: the host's own value, seen by
    its watch, is not taken for another writer's (Nerve's record carries less than an
    instance). A value a successor wrote on its own lease or session is left to it."""
    url_s = f"{registry_url}?spread={SPREAD}" + ("&format=nerve" if layout == "nerve" else "")
    agent, successor, reader = open_reg(url_s), open_reg(url_s), open_reg(url_s)
    mine, handed = inst(1, meta={"node": "kept"}), inst(2)  # "node": a Nerve reserved label
    for one in (mine, handed):
        agent.register(one)
    follower = Follower().follow(agent)
    restorer = agent._restorer  # type: ignore[attr-defined]
    wait_until(lambda: {mine.key, handed.key} <= set(follower.state), 5, "both seen")

    url = RegistryURL.parse(url_s)
    path = (agent._claims._nerve.path(mine.key)  # type: ignore[attr-defined]
            if layout == "nerve" else url.key(*mine.key))
    drained = dataclasses.replace(mine, state=State.DRAINING, weight=0)
    client = raw_client(url_s)
    try:
        changed = time.monotonic()
        if url.scheme == "etcd":
            client.put(path, drained.to_json())  # by hand: no lease
        else:
            client.set(path, to_nerve(drained) if layout == "nerve" else drained.to_json())
    finally:
        close_raw(client)

    def back() -> bool:
        seen = reader.snapshot().instances.get(mine.key)
        return seen is not None and restorer.same(mine, seen)

    wait_until(lambda: restorer.restored == 1, SPREAD + 2.0, "written back")
    took = time.monotonic() - changed
    assert back() and took <= SPREAD + 1.0, took
    if url.scheme == "etcd":  # on our lease again
        assert _owner(url_s, path) == agent._lease  # type: ignore[attr-defined]
    # its own value, seen by its watch, is not written again: nothing waits, and a turn
    # asked for by hand finds nothing to do
    wait_until(lambda: not restorer._due, 5, "nothing waiting")
    before = last_write(url_s, path)
    assert agent._restore(mine.key, False) == ""  # type: ignore[attr-defined]
    assert last_write(url_s, path) == before and restorer.restored == 1

    # the same value written back by hand with no lease (etcd; it would outlive this host),
    # or as a node of no session (ZooKeeper): put on ours again
    client = raw_client(url_s)
    try:
        if url.scheme == "etcd":
            client.put(path, client.get(path)[0])
        elif layout == "ours":
            data, stat = client.get(path)
            txn = client.transaction()  # one transaction: no write-back can come between
            txn.delete(path, version=stat.version)
            txn.create(path, data)  # persistent
            assert not any(isinstance(r, Exception) for r in txn.commit())
    finally:
        close_raw(client)
    if layout == "ours":
        wait_until(lambda: _owner(url_s, path) == _own(agent), SPREAD + 2.0, "ours again")
        wait_until(lambda: restorer.restored == 2, 5, "counted once")

    # a successor (a restarted agent) adopts one with another value: not undone
    successor.register(dataclasses.replace(handed, weight=5))
    wait_until(lambda: reader.snapshot().instances[handed.key].weight == 5, 5, "adopted")
    assert agent._restore(handed.key, False) == ""  # type: ignore[attr-defined]
    assert reader.snapshot().instances[handed.key].weight == 5


def _owner(url_s: str, path: str) -> int:
    """The lease (etcd) or session (ZooKeeper) ``path`` lives by; 0: none (or not there)."""
    client = raw_client(url_s)
    try:
        if RegistryURL.parse(url_s).scheme == "etcd":
            meta = client.get(path)[1]
            return int(meta.lease_id) if meta is not None else 0
        stat = client.exists(path)
        return int(stat.ephemeralOwner) if stat is not None else 0
    finally:
        close_raw(client)


def _own(reg: object) -> int:
    """The lease or session of a registry."""
    if hasattr(reg, "_lease"):
        return int(reg._lease)  # type: ignore[attr-defined]
    return int(reg.client.client_id[0])  # type: ignore[attr-defined]


def test_a_nodes_entry_with_no_lease_or_session_is_told_and_taken_back(
        registry_url: str, open_reg: OpenReg) -> None:
    """An entry of the node written by hand with no lease (etcd) or as a node of no session
    (ZooKeeper) would outlive the host; a watch that was down never saw it written, and a
    registry with no watch (`discovery agent` alone) has none: the node's snapshot tells it
    (``unowned``), and the agent's reconcile writes it again, onto the registry's own."""
    agent = open_reg(registry_url)  # no watch
    no_write_back(agent)  # nor own-key watches
    one = inst(4)
    agent.register(one)
    assert not agent.node_snapshot(one.node).unowned
    path = RegistryURL.parse(registry_url).key(*one.key)
    client = raw_client(registry_url)
    try:
        if registry_url.startswith("etcd"):
            client.put(path, client.get(path)[0])
        else:
            data, stat = client.get(path)
            txn = client.transaction()
            txn.delete(path, version=stat.version)
            txn.create(path, data)  # persistent
            assert not any(isinstance(r, Exception) for r in txn.commit())
    finally:
        close_raw(client)
    assert agent.node_snapshot(one.node).unowned == {one.key}
    agent.register(one)  # the reconcile's forced write
    assert _owner(registry_url, path) == _own(agent)
    assert not agent.node_snapshot(one.node).unowned


@pytest.mark.parametrize("registry_url, layout", [("etcd", "ours"), ("zk", "ours"),
                                                  ("zk", "nerve")], indirect=["registry_url"])
def test_a_registry_with_no_watch_writes_back_through_watches_of_its_own_keys(
        registry_url: str, open_reg: OpenReg, layout: str) -> None:
    """`discovery agent` alone (or a router following other services) has no watch that sees
    its own entries: watches of its own keys, and only those, tell it of one deleted or
    changed by hand, written back within ``spread`` + 1 s instead of at its reconcile (up to
    33 s); another host's entries are not its to watch. A watch of a service takes its keys
    off them; their key's deregister too."""
    url_s = f"{registry_url}?spread={SPREAD}" + ("&format=nerve" if layout == "nerve" else "")
    agent, other, reader = open_reg(url_s), open_reg(url_s), open_reg(url_s)
    web, api = inst(1), inst(2, service="api")
    theirs = inst(9, id="node-2:000000000009:80", node="node-2")
    restorer = agent._restorer  # type: ignore[attr-defined]
    scheduled: list[object] = []
    real_schedule = restorer._schedule
    restorer._schedule = lambda keys, *a, **kw: (scheduled.extend(keys),
                                                 real_schedule(keys, *a, **kw))
    for one in (web, api):
        agent.register(one)
    other.register(theirs)
    own = restorer.own
    assert own.keys == {web.key, api.key}
    wait_until(lambda: own.holds and other._restorer.own.holds, 5,  # type: ignore
               "their own keys watched")
    assert scheduled == []  # its own values, read (ZooKeeper), not taken for another's
    url = RegistryURL.parse(url_s)
    if url.scheme == "etcd":  # one watcher a key of its own, never the whole prefix
        stream = own._watch
        assert sorted(stream._ranges) == sorted(url.key(*k) for k in (web.key, api.key))
        assert not stream._widen and not stream.wide

    claims = getattr(agent, "_claims", None)
    paths = {k: claims.path_of(k) if claims is not None else url.key(*k)
             for k in (web.key, api.key)}
    drained = dataclasses.replace(api, state=State.DRAINING, weight=0)
    client = raw_client(url_s)
    try:
        hand = time.monotonic()
        client.delete(paths[web.key])  # the last (only) instance of web, by hand
        if url.scheme == "etcd":
            client.put(paths[api.key], drained.to_json())  # no lease
        else:
            client.set(paths[api.key], to_nerve(drained) if layout == "nerve"
                       else drained.to_json())
    finally:
        close_raw(client)

    def back() -> bool:
        seen = reader.snapshot().instances
        return all(k in seen and restorer.same(i, seen[k]) for k, i in
                   ((web.key, web), (api.key, api)))

    wait_until(lambda: restorer.restored == 2, SPREAD + 2.0, "both written back")
    took = time.monotonic() - hand
    assert back() and took <= SPREAD + 1.0, took
    assert other._restorer.own.keys == {theirs.key}  # type: ignore[attr-defined]

    # a watch of web: its key is that watch's to see; api's stays with the own-key watch
    Follower().follow_services(agent, ["web"])
    assert own.keys == {api.key}
    agent.deregister(*api.key)  # deregistered: no longer watched, and not written back
    assert own.keys == set()
    wait_until(lambda: api.key not in reader.snapshot().instances, 5, "api gone")
    assert not restorer._due and restorer.restored == 2


def test_an_etcd_own_key_watch_behind_a_compaction_reads_its_node_not_its_services(
        etcd_url: str, open_reg: OpenReg) -> None:
    """Its link down while etcd compacted past its revision, a watch of the registry's own keys
    reads again the host's own entries through the per-node index, not its keys' services
    fleet-wide (it read 200 instances of other hosts before), and writes back what another
    writer deleted meanwhile."""
    fill_foreign(etcd_url, 200, services=2)  # svc0, svc1: 100 instances each
    url = RegistryURL.parse(etcd_url)
    proxy = TcpProxy(url.hosts[0])
    try:
        agent = open_reg(proxy.url("etcd", url.prefix) + f"?spread={SPREAD}", ttl=6.0)
        ours = inst(1, service="svc0")
        agent.register(ours)
        own = agent._restorer.own  # type: ignore[attr-defined]
        wait_until(lambda: own.holds, 5, "its own key watched")
        states: list[bool] = []
        agent.add_state_listener(states.append)
        before = agent.reads.counts()
        client = raw_client(etcd_url)
        try:
            with proxy.blocked():
                wait_until(lambda: states[-1:] == [False], 5, "the link down")
                client.delete(url.key(*ours.key))  # by hand, while the link is down
                client.put(f"{url.prefix}/other", b"x")
                client.compact(int(client.get_response(f"{url.prefix}/other")
                                   .header.revision))
            wait_until(lambda: ours.key in open_reg(etcd_url).snapshot().instances,
                       OWN_LATER[1] * SPREAD + 3.0, "our entry written back")  # (its resume)
        finally:
            close_raw(client)
        cost = agent.reads.counts() - before
        assert cost.full_reads == 0 and cost.node_reads >= 1, cost
        assert cost.keys < 20, cost  # its node's index and entry, not svc0's 100
    finally:
        proxy.close()


def test_an_etcd_own_key_stream_resumes_spreads_after_a_lost_link_and_misses_nothing(
        etcd_url: str, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    """A fleet's full restart re-created every host's own-key watchers (one a key, about ten a
    host) within one resume spread, with the hosts' other resumes: the members' peak went from
    2.1-2.8x their steady rate to 7.3-12.3x (bench/fleet.py). After a lost link the stream of
    a host's own keys resumes 3 to 20 spreads later (``owned.OWN_LATER``), from its revision:
    another writer's delete made meanwhile is replayed then, and written back."""
    url = RegistryURL.parse(etcd_url)
    proxy = TcpProxy(url.hosts[0])
    reader = open_reg(etcd_url)
    client = raw_client(etcd_url)
    try:
        agent = open_reg(proxy.url("etcd", url.prefix) + f"?spread={SPREAD}", ttl=6.0)
        ours = inst(1)
        agent.register(ours)
        own = agent._restorer.own  # type: ignore[attr-defined]
        wait_until(lambda: own.holds, 5, "its own key watched")
        with caplog.at_level(logging.WARNING, logger=etcd_watch.__name__):
            proxy.cut()  # every connection of the agent reset; the member stays up
            cut = time.monotonic()
            client.delete(url.key(*ours.key))  # by hand, right after
            wait_until(lambda: ours.key in reader.snapshot().instances,
                       OWN_LATER[1] * SPREAD + 2.0, "our entry written back")
        took = time.monotonic() - cut
        # not before the stream's resume (nothing else of the agent reads or watches the key:
        # its own stream resumes within 3 to 20 spreads), then within spread= of the delete
        assert OWN_LATER[0] * SPREAD <= took <= OWN_LATER[1] * SPREAD + SPREAD + 1.0, took
        window = f"within {OWN_LATER[0] * SPREAD:g}-{OWN_LATER[1] * SPREAD:g} s"
        assert [r for r in caplog.records if window in r.getMessage()], caplog.text
        assert own._watch.endpoint is not None  # its stream open again
    finally:
        close_raw(client)
        proxy.close()


@pytest.mark.parametrize("registry_url", ["zk"], indirect=True)
def test_a_zookeeper_node_of_ours_deleted_goes_to_the_write_back_before_its_read(
        registry_url: str, open_reg: OpenReg, monkeypatch: pytest.MonkeyPatch) -> None:
    """ZooKeeper's events carry no data: a watch reads each node of an event before it
    delivers it, and behind a fleet's write-backs (every host reads every node written back)
    that read took seconds. The delete of a node the registry owns goes to its write-back at
    the event: the write-back reads the node first anyway."""
    url_s = f"{registry_url}?spread={SPREAD}"
    agent = open_reg(url_s)
    mine = inst(1)
    agent.register(mine)
    path = agent._claims.path_of(mine.key)  # type: ignore[attr-defined]
    order: list[str] = []
    restorer = agent._restorer  # type: ignore[attr-defined]
    lost, answered = restorer.lost, zk_watch.ZkWatch._answered

    def told(keys: Any) -> None:
        order.extend(["told"] if mine.key in keys else [])
        lost(keys)

    def read(self: Any, node: str, *args: Any) -> None:
        order.extend(["read"] if node == path else [])
        answered(self, node, *args)

    monkeypatch.setattr(restorer, "lost", told)  # before the watch: it keeps what it is given
    monkeypatch.setattr(zk_watch.ZkWatch, "_answered", read)
    follower = Follower().follow(agent)  # every service: `discovery up` with DNS or HTTP
    client = raw_client(url_s)
    try:
        client.delete(path)
    finally:
        close_raw(client)
    wait_until(lambda: restorer.restored == 1, SPREAD + 5.0, "written back")
    wait_until(lambda: mine.key in follower.state and "read" in order, 5, "seen back")
    assert order[0] == "told", order  # at the event, before the node's read came back


@pytest.mark.parametrize("registry_url", ["zk"], indirect=True)
def test_a_zookeeper_registry_writes_back_many_together(
        registry_url: str, open_reg: OpenReg) -> None:
    """Keys that fall due together (a registry slow to answer: each waited behind the last)
    are written back together: every node read in one go, then the missing ones created in
    one go; a changed one set back, one of another session's left alone, and one whose node
    refuses our write (NoAuth: an ACL of world READ only) left to the agent's reconcile
    without failing the rest."""
    agent, successor = open_reg(registry_url), open_reg(registry_url)
    gone, changed, taken, refused = inst(1), inst(2), inst(3), inst(4)
    for one in (gone, changed, taken, refused):
        agent.register(one)
    no_write_back(agent)  # no watch of its own keys: the test makes the turns
    successor.register(taken)  # a successor's adoption: on its session now
    url = RegistryURL.parse(registry_url)
    client = raw_client(registry_url)
    try:
        client.delete(url.key(*gone.key))
        for one in (changed, refused):
            client.set(url.key(*one.key), dataclasses.replace(one, weight=0).to_json())
        client.set_acls(url.key(*refused.key), [make_acl("world", "anyone", read=True)])
    finally:
        close_raw(client)
    keys = [gone.key, changed.key, taken.key, refused.key]
    done = agent._restore_many(keys)  # type: ignore[attr-defined]
    assert done == {gone.key: "deleted", changed.key: "changed", taken.key: ""}
    held = agent.snapshot().instances
    assert held[gone.key].same_registration(gone) and held[changed.key].weight == changed.weight
    assert held[refused.key].weight == 0  # the reconcile's
    assert agent._restore_many([gone.key, changed.key]) == {  # type: ignore[attr-defined]
        gone.key: "", changed.key: ""}  # there as written: nothing
