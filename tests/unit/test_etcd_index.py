"""An etcd registry's per-node index deleted by another writer (``etcdctl del --prefix
<prefix>/nodes/``): the agent's reconcile, which reads its node through the index, put back
only the index key of an instance still there as written, not the instance (a put under
``<prefix>/services/``, which every host that follows its service receives). Before, it wrote
every instance again: one put under ``services/`` an instance, fleet-wide, delivered to each
watcher. No server: a small in-memory etcd answers the requests of
:mod:`~discovery.registry.etcd_index` (gets, transactions with mod-revision compares, leases),
and counts the puts. Against a real etcd: tests/integration/test_fleet_scale.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pyetcd import transactions

from discovery.agent.history import History
from discovery.agent.registrations import Registrations
from discovery.metrics import Metrics
from discovery.model import Instance
from discovery.registry import etcd_aio
from discovery.registry.etcd import EtcdRegistry
from discovery.registry.url import RegistryURL

URL = "etcd://127.0.0.1:1/t?own=off"
LEASE, OTHER_LEASE = 7, 8
NODES, SERVICES = "/t/nodes/", "/t/services/"


class FakeEtcd:
    """Keys -> (value, lease, mod revision); every put kept, in order (``puts``)."""

    def __init__(self) -> None:
        self.kv: dict[str, tuple[bytes, int, int]] = {}
        self.revision = 1
        self.puts: list[str] = []
        self.before_put: list[Any] = []  # run once each, before the next transaction that puts
        self.put_txns = 0  # transactions that put (sent, whatever their compares said)

    def _header(self) -> Any:
        return SimpleNamespace(revision=self.revision, cluster_id=1, raft_term=1)

    def _meta(self, key: str) -> Any:
        _, lease, mod = self.kv[key]
        return SimpleNamespace(key=key.encode(), lease_id=lease, mod_revision=mod)

    def put(self, key: str, value: bytes, lease: int = 0) -> None:  # (another writer's)
        self.revision += 1
        self.kv[key] = (value, lease, self.revision)
        self.puts.append(key)

    def delete_prefix(self, prefix: str) -> None:
        for key in [k for k in self.kv if k.startswith(prefix)]:
            del self.kv[key]
        self.revision += 1

    def get(self, key: str) -> tuple[bytes | None, Any]:
        return (self.kv[key][0], self._meta(key)) if key in self.kv else (None, None)

    def get_range_response(self, start: bytes, end: bytes, keys_only: bool = False) -> Any:
        keys = sorted(k for k in self.kv if start.decode() <= k < end.decode())
        return SimpleNamespace(kvs=[SimpleNamespace(key=k.encode()) for k in keys],
                               header=self._header())

    def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        if any(isinstance(op, transactions.Put) for op in success):
            self.put_txns += 1
            if self.before_put:
                self.before_put.pop(0)()
        held = all(isinstance(c, transactions.Mod)
                   and (self.kv[c.key][2] if c.key in self.kv else 0) == c.value for c in compare)
        results: list[Any] = []
        for op in success if held else failure:
            if isinstance(op, transactions.Get):
                results.append([(self.kv[op.key][0], self._meta(op.key))]
                               if op.key in self.kv else [])
            elif isinstance(op, transactions.Put):
                self.put(op.key, op.value, op.lease)
            else:
                self.kv.pop(op.key, None)
        return held, results

    def lease(self, ttl: int) -> Any:
        return SimpleNamespace(id=LEASE, ttl=ttl)

    def revoke_lease(self, lease: int) -> None:
        self.kv = {k: v for k, v in self.kv.items() if v[1] != lease}

    def close(self) -> None:
        pass

    def services_puts(self) -> list[str]:
        return [k for k in self.puts if k.startswith(SERVICES)]

    def index(self) -> dict[str, int]:
        """The index keys, and the lease each is on."""
        return {k: v[1] for k, v in self.kv.items() if k.startswith(NODES)}


def inst(n: int, **kw: Any) -> Instance:
    return Instance(service="web", id=f"h1:{n:012x}:80", node="h1", address="192.0.2.1",
                    port=8000 + n, **kw)


@pytest.fixture
def etcd(monkeypatch: pytest.MonkeyPatch) -> FakeEtcd:
    fake = FakeEtcd()
    monkeypatch.setattr(etcd_aio, "Client", lambda **_: fake)
    return fake


@pytest.fixture
def reg(etcd: FakeEtcd) -> Iterator[EtcdRegistry]:
    r = EtcdRegistry(RegistryURL.parse(URL), ttl=60, timeout=1.0)  # (no renewal in a test)
    yield r
    r.close()


def agent(reg: EtcdRegistry) -> tuple[Registrations, dict[tuple[str, str], Instance]]:
    """An agent's registrations of three instances, written."""
    regs = Registrations(reg, "h1", Metrics(), History(), lambda: None)
    wanted = {i.key: i for i in (inst(1), inst(2), inst(3))}
    for key, one in wanted.items():
        assert regs.write(key, one)
    return regs, wanted


def reconcile(regs: Registrations, reg: EtcdRegistry,
              wanted: dict[tuple[str, str], Instance]) -> None:
    """One reconcile, as the agent's (core.py): its node read, then the wishes written."""
    read_at = time.monotonic()
    snap = reg.node_snapshot("h1")
    with regs.turn():
        regs.reconcile(snap, wanted, read_at)
    assert regs.flush(5)


def test_a_deleted_index_puts_back_the_index_keys_alone(reg: EtcdRegistry,
                                                        etcd: FakeEtcd) -> None:
    """The whole index deleted under three unchanged instances: the reconcile after it
    writes nothing under ``services/`` (before: three puts, each delivered to every watcher of
    ``web`` in the fleet), three index keys, on the agent's lease; the one after it, nothing."""
    regs, wanted = agent(reg)
    written = {k: v for k, v in etcd.kv.items() if k.startswith(SERVICES)}
    index = etcd.index()
    assert len(index) == 3 and set(index.values()) == {LEASE}
    etcd.delete_prefix(NODES)
    etcd.puts.clear()
    txns = etcd.put_txns

    reconcile(regs, reg, wanted)
    assert etcd.services_puts() == []
    assert {k: v for k, v in etcd.kv.items() if k.startswith(SERVICES)} == written  # as was
    assert etcd.index() == index and len(etcd.puts) == 3
    assert etcd.put_txns - txns == 1  # all three in one round trip (before: one each)

    etcd.puts.clear()  # the index whole again: the next reconcile reads it, writes nothing
    reconcile(regs, reg, wanted)
    assert etcd.puts == []


def test_an_instance_not_there_as_written_is_written_by_the_reconcile(
        reg: EtcdRegistry, etcd: FakeEtcd) -> None:
    """Only an instance there as written, on the registry's lease, gets its index key alone:
    one changed by another writer is written again (instance and index key); one deleted is
    written again too, its index key with it (never an index key alone, naming nothing); one
    on another lease (a successor's adoption) is written on ours, as before."""
    regs, wanted = agent(reg)
    changed, deleted, moved = (SERVICES + f"web/{inst(n).id}" for n in (1, 2, 3))
    etcd.delete_prefix(NODES)
    etcd.put(changed, inst(1, weight=0).to_json(), LEASE)
    del etcd.kv[deleted]
    etcd.put(moved, etcd.kv[moved][0], OTHER_LEASE)
    etcd.puts.clear()

    reconcile(regs, reg, wanted)
    assert sorted(etcd.services_puts()) == sorted([changed, deleted, moved])
    assert set(etcd.index().values()) == {LEASE} and len(etcd.index()) == 3
    assert len(etcd.puts) == 6  # each instance with its index key, in one transaction


def test_an_instance_changed_after_its_read_gets_no_index_key(reg: EtcdRegistry,
                                                               etcd: FakeEtcd) -> None:
    """The index key's put compares the instance's mod revision with the one read: an
    instance deleted (or written again) in between gets no index key of its lease, and the
    node read leaves it out (the agent's reconcile writes it); the others are put back
    together once the transaction of them all failed (its failure side read them)."""
    agent(reg)
    gone = SERVICES + f"web/{inst(1).id}"
    etcd.delete_prefix(NODES)
    etcd.before_put.append(lambda: etcd.kv.pop(gone))  # after the read, before the put
    txns = etcd.put_txns
    snap = reg.node_snapshot("h1")
    assert etcd.put_txns - txns == 2  # all in one, refused; then the two unchanged together
    assert set(snap.instances) == {inst(2).key, inst(3).key}
    assert sorted(etcd.index()) == sorted(NODES + f"h1/web/{inst(n).id}" for n in (2, 3))
    assert gone not in etcd.kv


def test_what_the_registry_is_not_sure_of_is_left_to_the_agent(reg: EtcdRegistry,
                                                                etcd: FakeEtcd) -> None:
    """A key whose last write lost its answer (unsettled: the agent writes it again), and
    every key while the lease's keeper has instances to write again (a new lease): no index
    key put back, nothing read for them."""
    agent(reg)
    etcd.delete_prefix(NODES)
    etcd.puts.clear()
    reg._restorer.unsettled.add(inst(1).key)
    assert set(reg.node_snapshot("h1").instances) == {inst(2).key, inst(3).key}
    assert len(etcd.puts) == 2
    etcd.delete_prefix(NODES)
    reg._need_reput = True
    try:
        assert reg.node_snapshot("h1").instances == {}
    finally:
        reg._need_reput = False
    assert etcd.index() == {}
