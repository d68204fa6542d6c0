"""etcd_read's reads of many services (a watcher routing k services): how many requests, of
what size, and what happens when the cluster refuses a transaction. No server: a small
in-memory KV answers ``Range`` and ``Txn`` as etcd does (sorted keys, ``limit``, ``more``,
``count``). The same reads against a real etcd: tests/integration/test_fleet_scale.py."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from discovery.errors import RegistryDenied
from discovery.model import Instance
from discovery.registry.etcd_read import TXN_OPS, _packs, read_snapshot
from discovery.registry.reads import ReadStats
from tests.harness.rpc import Answer

ROOT = "/t/services/"


class FakeEtcd:
    """Sorted keys at revision 7; ``max_txn_ops`` and ``max_keys`` (a message larger than the
    receive limit) as a cluster may set them. Counts requests by kind."""

    def __init__(self, services: dict[str, int], max_txn_ops: int = 128,
                 max_keys: int = 10**6, denied: tuple[str, ...] = ()) -> None:
        self.kv = {f"{ROOT}{s}/{s}-{n}".encode(): b"v" for s, count in services.items()
                   for n in range(count)}
        self.keys = sorted(self.kv)
        self.max_txn_ops, self.max_keys = max_txn_ops, max_keys
        self.requests: list[tuple[str, int]] = []  # (kind, operations)
        self.denied = {f"{ROOT}{s}/".encode() for s in denied}  # the role may not read those

    def _range(self, key: bytes, end: bytes, limit: int = 0, count_only: bool = False) -> Any:
        if key in self.denied:  # etcd denies a request (a whole transaction) that asks one
            raise Answer(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
        keys = self.keys[bisect_left(self.keys, key):bisect_left(self.keys, end)]
        shown = keys[:limit] if limit else keys
        kvs = [] if count_only else [SimpleNamespace(key=k, value=self.kv[k]) for k in shown]
        return SimpleNamespace(kvs=kvs, more=len(shown) < len(keys), count=len(keys),
                               header=SimpleNamespace(revision=7))

    def get_range_response(self, start: bytes, end: bytes, limit: int = 0,
                           revision: int | None = None, keys_only: bool = False) -> Any:
        self.requests.append(("range", 1))
        resp = self._range(start, end, limit)
        if len(resp.kvs) > self.max_keys:
            raise Answer(grpc.StatusCode.RESOURCE_EXHAUSTED, "received message larger than max")
        return resp

    def get_response(self, key: bytes) -> Any:
        self.requests.append(("range", 1))
        return self._range(key, key + b"\0")

    def txn_response(self, request: Any) -> Any:
        self.requests.append(("txn", len(request.success)))
        if len(request.success) > self.max_txn_ops:
            raise Answer(grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: too many operations in txn request")
        answers = [self._range(op.request_range.key, op.request_range.range_end,
                               count_only=op.request_range.count_only)
                   for op in request.success]
        if sum(len(a.kvs) for a in answers) > self.max_keys:
            raise Answer(grpc.StatusCode.RESOURCE_EXHAUSTED, "received message larger than max")
        return SimpleNamespace(header=SimpleNamespace(revision=7),
                               responses=[SimpleNamespace(response_range=a) for a in answers])


def decode(key: str, value: bytes) -> Instance | None:
    if value != b"v":  # a value that does not decode
        return None
    service, _, rest = key[len(ROOT):].partition("/")
    return Instance(service=service, id=f"n:{rest.replace('-', '')}:80", node="n",
                    address="192.0.2.1", port=80)


def call(what: str, fn: Callable[[], Any], closing: bool = False) -> Any:
    try:
        return fn()
    except Answer as exc:  # as EtcdRegistry._call says it
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            raise RegistryDenied(f"{what} failed: permission denied") from None
        raise


def read(etcd: FakeEtcd, services: list[str], page_keys: int = 1000,
         denied: Callable[[str], None] | None = None) -> dict[str, int]:
    snap = read_snapshot(call, etcd, decode, ROOT, services=services, page_keys=page_keys,
                         reads=ReadStats(), denied=denied)
    assert snap.revision == 7
    found: dict[str, int] = {}
    for service, _ in snap.instances:
        found[service] = found.get(service, 0) + 1
    return found


def test_packs_hold_at_most_a_page_of_keys_and_txn_ops_roots() -> None:
    counts = [(f"r{n}", 3) for n in range(10)] + [("big", 50), ("r10", 3)]
    assert list(_packs(counts, 10)) == [
        ["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6", "r7", "r8"], ["r9"], ["big"], ["r10"]]
    many = [(f"r{n}", 0) for n in range(TXN_OPS + 1)]
    assert [len(p) for p in _packs(many, 1000)] == [TXN_OPS, 1]
    assert list(_packs([], 1000)) == []


def test_a_thousand_services_are_read_in_twenty_requests() -> None:
    services = {f"svc{n:04d}": 10 for n in range(1000)}
    etcd = FakeEtcd(services)
    assert read(etcd, [*services, "absent"]) == services
    # 11 counts (1,001 services, 100 a request), then 10 reads of 1,000 keys
    assert etcd.requests == [("txn", 100)] * 10 + [("txn", 1)] + [("txn", 100)] * 10


def test_a_service_larger_than_a_page_is_paged_on_its_own() -> None:
    etcd = FakeEtcd({"small": 3, "big": 25, "other": 4})
    assert read(etcd, ["small", "big", "other"], page_keys=10) == {
        "small": 3, "big": 25, "other": 4}
    kinds = [kind for kind, _ in etcd.requests]
    assert kinds == ["txn", "range", "range", "range", "txn"]  # counts, big's pages, the rest


def test_a_cluster_allowing_fewer_operations_is_read_one_service_at_a_time() -> None:
    services = {f"svc{n}": 2 for n in range(30)}
    etcd = FakeEtcd(services, max_txn_ops=8)
    assert read(etcd, list(services)) == services
    assert etcd.requests[0] == ("txn", 30)  # refused
    assert etcd.requests[1:] == [("range", 1)] * 30


def test_an_answer_too_large_is_read_again_service_by_service() -> None:
    etcd = FakeEtcd({"a": 6, "b": 6, "c": 6}, max_keys=10)
    assert read(etcd, ["a", "b", "c"], page_keys=20) == {"a": 6, "b": 6, "c": 6}
    assert etcd.requests == [("txn", 3), ("txn", 3)] + [("range", 1)] * 3


@pytest.mark.parametrize("services", [[], ["absent"]])
def test_nothing_to_read(services: list[str]) -> None:
    etcd = FakeEtcd({"a": 3})
    assert read(etcd, services) == {}
    assert len(etcd.requests) == 1  # the revision to watch from, or the one count


@pytest.mark.parametrize("max_txn_ops", [128, 2])
def test_a_service_the_role_may_not_read_is_left_out(max_txn_ops: int) -> None:
    """One denied service fails etcd's whole transaction: it is halved down to the denied one,
    which is told, left out and named withheld, the others read (also one request a service)."""
    etcd = FakeEtcd({"a": 2, "b": 3, "c": 1}, max_txn_ops=max_txn_ops, denied=("b",))
    told: list[str] = []
    assert read(etcd, ["a", "b", "c"], denied=told.append) == {"a": 2, "c": 1}
    assert told == [f"{ROOT}b/"]
    if max_txn_ops > 3:  # the refused count, its halves apart, the two read in one request
        assert etcd.requests == [("txn", 3), ("txn", 1), ("txn", 2), ("txn", 1), ("txn", 1),
                                 ("txn", 2)]
    else:  # too many operations (before the denial), then one read a service
        assert etcd.requests == [("txn", 3)] + [("range", 1)] * 3
    snap = read_snapshot(call, etcd, decode, ROOT, services=["a", "b", "c"],
                         denied=lambda r: None)
    assert snap.withheld == {"b"}  # named: a reader keeps what it had of b


def test_one_denied_service_of_a_hundred_costs_a_few_counts() -> None:
    """The refused transaction is halved three times, then counted root by root: 20 counts,
    not 101."""
    services = {f"svc{n:03d}": 1 for n in range(100)}
    etcd = FakeEtcd(services, denied=("svc042",))
    told: list[str] = []
    assert len(read(etcd, list(services), denied=told.append)) == 99
    assert told == [f"{ROOT}svc042/"]
    counts = [n for kind, n in etcd.requests[:-1]]  # the last: the read of the 99
    assert len(counts) <= 20 and etcd.requests[-1] == ("txn", 99), etcd.requests


def test_every_service_denied_or_no_one_to_tell_fails_the_read() -> None:
    """Every followed service denied is the credentials: the read fails, as it does for one
    denied service when the caller gives no ``denied`` (the agent's reads)."""
    told: list[str] = []
    with pytest.raises(RegistryDenied):
        read(FakeEtcd({"a": 1, "b": 1}, denied=("a", "b")), ["a", "b"], denied=told.append)
    assert told == []  # nothing skipped is counted: the read failed as a whole
    with pytest.raises(RegistryDenied):
        read(FakeEtcd({"a": 1, "b": 1}, denied=("b",)), ["a", "b"])


@pytest.mark.parametrize("services", [None, ["a", "b"]])
def test_values_that_do_not_decode_are_named_unreadable(services: list[str] | None) -> None:
    """An entry whose value does not decode (or is too large) is left out of ``instances``
    and named in ``unreadable`` (a reader keeps its last good value); a key outside the
    layout is not named. Without ``split`` nothing is named."""
    etcd = FakeEtcd({"a": 3, "b": 2})
    etcd.kv[f"{ROOT}a/a-1".encode()] = b"{not json"
    etcd.kv[f"{ROOT}b/b-0".encode()] = b"v" * 100  # larger than max_value below
    outside = f"{ROOT}b/b-9/deeper".encode()  # not an instance's key: not ours to name
    etcd.kv[outside] = b"{not json"
    etcd.keys = sorted(etcd.kv)
    snap = read_snapshot(call, etcd, decode, ROOT, services=services, max_value=10,
                         split=split)
    assert sorted(snap.instances) == [("a", "n:a0:80"), ("a", "n:a2:80"), ("b", "n:b1:80")]
    assert snap.unreadable == {("a", "a-1"), ("b", "b-0")}
    assert not read_snapshot(call, etcd, decode, ROOT, services=services).unreadable


def split(key: str) -> tuple[str, str] | None:
    """``RegistryURL.split_key`` of ROOT's layout: ``<service>/<id>``."""
    parts = key[len(ROOT):].split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else None


class ShrinkingTxns(FakeEtcd):
    """A cluster whose member takes the counts and the first read, then allows fewer
    operations a transaction (members of different ``--max-txn-ops``), the bad entry read by
    the first read deleted meanwhile."""

    def txn_response(self, request: Any) -> Any:
        if not request.success[0].request_range.count_only:
            reads = sum(1 for kind, _ in self.requests if kind == "txn")
            if reads > 1:  # the counts (one), the first read: then too many operations
                self.requests.append(("txn", len(request.success)))
                del self.kv[f"{ROOT}a/a-1".encode()]
                self.keys = sorted(self.kv)
                raise Answer(grpc.StatusCode.INVALID_ARGUMENT,
                             "etcdserver: too many operations in txn request")
        return super().txn_response(request)


def test_a_read_started_again_names_only_what_it_found_unreadable() -> None:
    """A read of many services that must start again one request a service (too many
    operations) names as unreadable only what the new read found: an entry found bad by the
    first read and deleted since would be kept on every reader for ever (its delete is before
    the revision the watch resumes from)."""
    etcd = ShrinkingTxns({"a": 3, "b": 2}, max_keys=3)  # a and b: two reads
    etcd.kv[f"{ROOT}a/a-1".encode()] = b"{not json"
    snap = read_snapshot(call, etcd, decode, ROOT, services=["a", "b"], page_keys=3,
                         split=split)
    assert ("txn", 2) in etcd.requests and ("range", 1) in etcd.requests  # started again
    assert sorted(snap.instances) == [("a", "n:a0:80"), ("a", "n:a2:80"), ("b", "n:b0:80"),
                                      ("b", "n:b1:80")]
    assert not snap.unreadable
