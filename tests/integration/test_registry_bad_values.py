"""An entry that is there but cannot be read keeps its last good value on every reader.

The registry is shared: one bad write reaches every host at once. A value that turns bad (a
newer ``schema`` written by an agent upgraded before the watchers, a hand edit gone wrong)
used to count as a delete, so it took the instance out of every host's routing; on ZooKeeper
so did a node whose own ACL was changed to deny us, at the next full read (a session expiry).
Now each reader keeps what it had of such an entry (``Snapshot.unreadable``), until the entry
is deleted (still seen) or readable again.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from kazoo.client import KazooClient

from discovery.model.catalog import Catalog
from discovery.registry import Registry, RegistryURL, open_registry, zk_persistent, zk_watch
from discovery.registry.base import FIRST_READ, Snapshot
from tests.harness.raw_clients import expire_zk_session, raw_put
from tests.harness.registries import LOCKED, no_write_back
from tests.harness.servers import ServerCluster, unique_prefix, wait_until
from tests.integration.test_registry_contract import OpenReg, inst, open_reg

__all__ = ["open_reg"]
pytestmark = pytest.mark.integration

#: a record of a schema newer than this version knows: skipped, not misread
NEWER = b'{"schema": 99, "service": "web"}'


def followed(reader: Registry) -> tuple[Catalog, list[str]]:
    """A catalog fed by ``reader``'s watch from its snapshot, and the kinds it was fed."""
    catalog, kinds = Catalog(), []
    snap = reader.snapshot()
    catalog.load(snap)
    reader.watch(lambda c: (kinds.append(c.kind), catalog.apply(c)), snap.revision)
    return catalog, kinds


def test_a_value_turned_bad_keeps_its_last_good_value(registry_url: str,
                                                      open_reg: OpenReg) -> None:
    url = RegistryURL.parse(registry_url)
    writer, reader = open_reg(registry_url), open_reg(registry_url)
    a, b, c = inst(1), inst(2), inst(3)
    writer.register(a)
    catalog, kinds = followed(reader)
    behind = Catalog()  # a reader that will have to read everything again (a reset)
    first = reader.snapshot()
    behind.load(first)

    raw_put(registry_url, url.key(*a.key), NEWER)
    writer.register(b)  # after the bad write: once b is in, the bad write was delivered
    wait_until(lambda: catalog.get(b.key) is not None, 10, "the write after the bad one")
    assert catalog.get(a.key) == a  # kept as it was (it was taken out as if deleted)
    snap = reader.snapshot()
    assert a.key not in snap.instances and snap.unreadable == {a.key}

    # A reset keeps it too: etcd compacted under a watch, a ZooKeeper session expired.
    if url.scheme == "etcd":
        import pyetcd

        raw = pyetcd.client(*url.hosts[0], timeout=5)
        try:
            raw.compact(snap.revision)
        finally:
            raw.close()
        resets: list[str] = []
        reader.watch(lambda ch: (resets.append(ch.kind), behind.apply(ch)), first.revision)
        wait_until(lambda: resets, 10, "the reset of a watch from a compacted revision")
        assert resets[0] == "reset" and behind.get(b.key) == b and behind.get(a.key) == a
    else:
        expire_zk_session(reader.client)  # type: ignore[attr-defined]
        wait_until(lambda: "reset" in kinds, 10, "the reset after the session expired")
    writer.register(c)
    wait_until(lambda: catalog.get(c.key) is not None, 10, "a write after the reset")
    assert catalog.get(a.key) == a and catalog.get(b.key) == b

    a2 = replace(a, weight=7)  # readable again: its new value
    writer.register(a2)
    wait_until(lambda: catalog.get(a.key) == a2, 10, "the value written readable again")
    raw_put(registry_url, url.key(*a.key), NEWER)
    writer.deregister("web", a.id)  # deleted while bad: gone
    wait_until(lambda: catalog.get(a.key) is None, 10, "the delete of the bad entry")
    assert catalog.get(b.key) == b and catalog.get(c.key) == c


@pytest.mark.parametrize("watches", ["persistent", "one-shot"])
def test_a_node_its_own_acl_locks_keeps_its_instance(
        zk: ServerCluster, regs: list[Registry], other: KazooClient, watches: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ZooKeeper instance node whose own ACL is changed to deny us (not its directory's):
    kept through a full read (a session expiry). ZooKeeper tells no watch of ours about that
    node, not even its delete, so the watch looks at it again after the refusals' doubling
    wait: its delete is seen within the longest wait."""
    monkeypatch.setattr(zk_watch, "REFUSED_WAIT", (0.4, 1.6))
    if watches == "one-shot":
        monkeypatch.setattr(zk_persistent.AddWatch, "type", 250)  # UNIMPLEMENTED: one-shot
    url = zk.url(unique_prefix())
    path = RegistryURL.parse(url).key(*inst(1).key)
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    a, b, c = inst(1), inst(2), inst(3)
    writer.register(a)
    writer.register(b)
    catalog, kinds = followed(reader)
    other.set_acls(path, LOCKED)
    assert reader.snapshot().unreadable == {a.key}
    skipped = reader.invalid_records

    expire_zk_session(reader.client)  # type: ignore[attr-defined]
    wait_until(lambda: "reset" in kinds, 10, "the reset after the session expired")
    writer.register(c)
    wait_until(lambda: catalog.get(c.key) is not None, 10, "a write after the reset")
    assert catalog.get(a.key) == a and catalog.get(b.key) == b  # kept: it was dropped
    assert reader.invalid_records > skipped  # and named

    other.delete(path)  # deleting needs the directory's permission, not the node's
    start = time.monotonic()
    wait_until(lambda: catalog.get(a.key) is None, 10, "the delete of the locked node")
    took = time.monotonic() - start
    print(f"the locked node's delete seen after {took:.2f} s")
    assert took < 1.6 * 1.1 + 1.0, took  # the longest wait, jittered, and a full read
    assert catalog.get(b.key) == b and catalog.get(c.key) == c


def _nerve_pair(zk: ServerCluster, regs: list[Registry]) -> tuple[str, Registry, Registry]:
    """Service web's folder, a writer and a reader under Nerve's layout."""
    host, port = zk.address(0)
    base = f"{unique_prefix()}/nerve"
    url = f"zk://{host}:{port}{base}?format=nerve&path={base}/services/{{service}}/services"
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    return f"{base}/services/web/services", writer, reader


def test_a_nerve_node_turned_bad_keeps_its_instance(
        zk: ServerCluster, regs: list[Registry], other: KazooClient) -> None:
    """Under Nerve's layout a node's name does not say its instance (the port is in its
    data): the watch keeps what the node held when last read, through a full read too."""
    folder, writer, reader = _nerve_pair(zk, regs)
    a, b, c = inst(1), inst(2), inst(3)
    writer.register(a)
    catalog, kinds = followed(reader)
    first = catalog.get(a.key)  # (Nerve keeps no registered_at: the node's mtime)
    assert first is not None and first.port == a.port
    [node] = other.get_children(folder)
    other.set(f"{folder}/{node}", b'{"host": "127.0.0.1"}')  # no port: not an instance
    writer.register(b)
    wait_until(lambda: catalog.get(b.key) is not None, 10, "the write after the bad one")
    assert catalog.get(a.key) == first

    expire_zk_session(reader.client)  # type: ignore[attr-defined]
    wait_until(lambda: "reset" in kinds, 10, "the reset after the session expired")
    writer.register(c)
    wait_until(lambda: catalog.get(c.key) is not None, 10, "a write after the reset")
    assert catalog.get(a.key) == first

    no_write_back(writer)  # its delete is the test's, not one to write back
    other.delete(f"{folder}/{node}")
    wait_until(lambda: catalog.get(a.key) is None, 10, "the delete of the bad node")
    assert catalog.get(b.key) is not None and catalog.get(c.key) is not None


def test_a_nerve_node_turned_bad_is_kept_by_a_new_watchs_read(
        zk: ServerCluster, regs: list[Registry], other: KazooClient) -> None:
    """A watcher's SIGHUP (a client following more services) reads through a new watch beside
    the old one: the new read cannot tell which instance a bad Nerve node held, but the
    host's running watch can, so the read keeps it (it used to leave it out: the instance
    went from that host's routing, until the node was readable again)."""
    folder, writer, reader = _nerve_pair(zk, regs)
    a, b = inst(1), inst(2)
    writer.register(a)
    catalog, _ = followed(reader)  # the watch running before the SIGHUP
    [node] = other.get_children(folder)
    other.set(f"{folder}/{node}", b'{"host": "127.0.0.1"}')  # no port: not an instance
    writer.register(b)
    wait_until(lambda: catalog.get(b.key) is not None, 10, "the write after the bad one")

    resets: list[Snapshot] = []
    reader.watch(lambda c: resets.append(c.snapshot) if c.snapshot else None, FIRST_READ,
                 ["web", "api"])
    assert len(resets) == 1  # delivered within watch()
    assert a.key not in resets[0].instances and resets[0].unreadable == {a.key}
    assert resets[0].keeps(a.key) and b.key in resets[0].instances
    assert reader.snapshot().unreadable == {a.key}  # a read of the registry keeps it too
