"""Full etcd reads larger than gRPC's 4 MiB default, against a real etcd (issue 8, part A).

The data is written with a raw client (transactions of 128 puts, etcd's default
--max-txn-ops), bypassing the registry code; each test first shows that one unpaginated read
of it fails, so it would fail without the paging.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pyetcd
import pytest

from discovery.errors import InvalidRecord
from discovery.model import Instance
from discovery.registry import Change, RegistryURL, etcd_aio, etcd_watch, open_registry
from discovery.registry.etcd_read import read_snapshot
from discovery.registry.view import ServicesView
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration

FOUR_MIB = 4 * 1024 * 1024
TXN_OPS = 128  # etcd's default --max-txn-ops


@pytest.fixture
def raw(etcd_url: str) -> Iterator[Any]:
    host, port = RegistryURL.parse(etcd_url).hosts[0]
    client = pyetcd.client(host, port, timeout=10)  # gRPC's default 4 MiB receive limit
    yield client
    client.delete_prefix(RegistryURL.parse(etcd_url).prefix + "/")
    client.close()


def inst(n: int, service: str = "web") -> Instance:
    meta = {f"k{i}": f"value-{n}-{i}-" + "x" * 20 for i in range(6)}  # ~420 bytes in all
    return Instance(service=service, id=f"node-{n % 7}:{n:012x}:80", node=f"node-{n % 7}",
                    address="127.0.0.1", port=1024 + n % 60000, meta=meta, registered_at=1.0)


def write(raw: Any, items: dict[str, bytes]) -> int:
    """Put ``items`` (key -> value) in transactions of at most 128 puts and 1 MB (etcd's
    default limits: --max-txn-ops, --max-request-bytes); the bytes written."""
    batch: list[Any] = []
    size = total = 0
    for key, value in items.items():
        if batch and (len(batch) == TXN_OPS or size + len(value) > 1_000_000):
            raw.transaction(compare=[], success=batch, failure=[])
            batch, size = [], 0
        batch.append(raw.transactions.put(key, value))
        size += len(value)
        total += len(value)
    if batch:
        raw.transaction(compare=[], success=batch, failure=[])
    return total


def unpaginated_read_fails(raw: Any, url: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw.get_prefix_response(RegistryURL.parse(url).services_root + "/")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def plain_call(what: str, fn: Any, closing: bool = False) -> Any:
    return fn()


def plain_decode(key: str, raw: bytes) -> Instance | None:
    try:
        return Instance.from_json(raw, where=key)
    except InvalidRecord:
        return None


def test_snapshot_of_many_small_instances_then_watch(etcd_url: str, raw: Any) -> None:
    url = RegistryURL.parse(etcd_url)
    made = {x.key: x for x in (inst(n, ("web", "api", "db")[n % 3]) for n in range(12_000))}
    size = write(raw, {url.key(*k): x.to_json() for k, x in made.items()})
    assert size > FOUR_MIB, size
    unpaginated_read_fails(raw, etcd_url)

    reg, writer = open_registry(etcd_url), open_registry(etcd_url)
    try:
        t0 = time.monotonic()
        snap = reg.snapshot()
        took = time.monotonic() - t0
        assert len(snap.instances) == len(made)
        assert snap.instances == made
        assert took < 15, f"snapshot of {len(made)} instances took {took:.1f}s"

        seen: list[Change] = []
        lock = threading.Lock()

        def follow(change: Change) -> None:
            with lock:
                seen.append(change)

        reg.watch(follow, snap.revision)
        new = inst(99_999, "web")
        writer.register(new)
        gone = next(iter(made))
        raw.delete(url.key(*gone))

        def both() -> bool:
            with lock:
                kinds = {(c.kind, c.key) for c in seen}
            return ("put", new.key) in kinds and ("delete", gone) in kinds

        wait_for(both, 10, message="the watch after a paged snapshot sees a put and a delete")
        assert reg.snapshot().instances.keys() == (made.keys() - {gone}) | {new.key}
    finally:
        writer.close(revoke=True)
        reg.close(revoke=False)


def test_values_near_etcd_request_limit(etcd_url: str, raw: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    url = RegistryURL.parse(etcd_url)
    good = {x.key: x for x in (inst(n) for n in range(5))}
    big = {url.key("web", f"node-1:{n:012x}:81"): b"{" + b" " * 1_400_000 + b"}"
           for n in range(3)}  # ~1.4 MB each: under etcd's 1.5 MiB request limit, not instances
    size = write(raw, {**big, **{url.key(*k): x.to_json() for k, x in good.items()}})
    assert size > FOUR_MIB
    unpaginated_read_fails(raw, etcd_url)

    reg = open_registry(etcd_url)  # 64 MiB receive limit: one page
    try:
        assert reg.snapshot().instances == good
    finally:
        reg.close(revoke=False)

    root = url.services_root + "/"
    host, port = url.hosts[0]
    for limit, skipped in ((2 * 1024 * 1024, False), (1024 * 1024, True)):
        # 2 MiB: pages shrink until each fits; 1 MiB: a single 1.4 MB value never fits
        client = pyetcd.client(host, port, timeout=10,
                               grpc_options=[("grpc.max_receive_message_length", limit)])
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="discovery.registry.etcd_read"):
                snap = read_snapshot(plain_call, client, plain_decode, root)
        finally:
            client.close()
        assert snap.instances == good
        named = [k for k in big if k in caplog.text]
        assert named == (list(big) if skipped else []), caplog.text

    caplog.clear()
    client = pyetcd.client(host, port, timeout=10)
    try:
        with caplog.at_level(logging.WARNING, logger="discovery.registry.etcd_read"):
            snap = read_snapshot(plain_call, client, plain_decode, root, max_value=1_000_000)
    finally:
        client.close()
    assert snap.instances == good
    assert all(f"{k} is 1400002 bytes" in caplog.text for k in big), caplog.text


class CompactsAfterFirstRequest:
    """A real client that, right after its first read (a page, or a transaction of ranges),
    writes one more instance through ``raw`` and compacts etcd up to it, so that the next
    read's revision is gone. Counts the reads it passed on."""

    def __init__(self, client: Any, raw: Any, key: str, value: bytes) -> None:
        self.client, self.raw, self.key, self.value = client, raw, key, value
        self.requests, self.compacted = 0, 0

    def get_range_response(self, *args: Any, **kwargs: Any) -> Any:
        return self._after(self.client.get_range_response(*args, **kwargs))

    def txn_response(self, request: Any) -> Any:
        return self._after(self.client.txn_response(request))

    def _after(self, resp: Any) -> Any:
        self.requests += 1
        if self.requests == 1:
            self.raw.put(self.key, self.value)
            self.compacted = int(self.raw.get_response(self.key).header.revision)
            self.raw.compact(self.compacted)
        return resp


def test_compaction_mid_read_starts_again(etcd_url: str, raw: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    url = RegistryURL.parse(etcd_url)
    made = {x.key: x for x in (inst(n) for n in range(50))}
    write(raw, {url.key(*k): x.to_json() for k, x in made.items()})
    extra = inst(1000)
    client = CompactsAfterFirstRequest(raw, raw, url.key(*extra.key), extra.to_json())
    with caplog.at_level(logging.WARNING, logger="discovery.registry.etcd_read"):
        snap = read_snapshot(plain_call, client, plain_decode, url.services_root + "/",
                             page_keys=10)
    assert "compacted" in caplog.text
    assert snap.revision >= client.compacted > 0
    assert snap.instances == {**made, extra.key: extra}  # one consistent read, at the new revision
    assert client.requests == 1 + 6  # the aborted read's first page, then 51 keys in pages of 10


def etcd_requests(url: str) -> int:
    """The reads etcd served so far (``Range`` and ``Txn`` answered OK), from its /metrics."""
    host, port = RegistryURL.parse(url).hosts[0]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(r'^grpc_server_handled_total\{grpc_code="OK",grpc_method="(?:Range|Txn)",'
                       r'grpc_service="etcdserverpb\.KV"[^}]*\} (\d+)', text, re.M)
    assert len(found) == 2, "etcd's /metrics lacks its KV counters"
    return sum(map(int, found))


def test_many_services_are_read_in_a_few_transactions(etcd_url: str, raw: Any) -> None:
    """A watcher routing k services (ServicesView) reads them in transactions of many ranges
    at one revision, not a request each: 301 services in 8 requests, counted by etcd."""
    url = RegistryURL.parse(etcd_url)
    made = {x.key: x for x in (inst(n, f"s{n % 300}") for n in range(600))}
    made.update({x.key: x for x in (inst(n, "big") for n in range(1000, 1030))})
    other = {x.key: x for x in (inst(n, "other") for n in range(2000, 2050))}  # not routed
    write(raw, {url.key(*k): x.to_json() for k, x in {**made, **other}.items()})
    reg = open_registry(etcd_url)
    try:
        view = ServicesView(reg, [f"s{n}" for n in range(300)] + ["big", "absent"])
        before = etcd_requests(etcd_url)
        snap = view.snapshot()
        spent = etcd_requests(etcd_url) - before
    finally:
        reg.close(revoke=False)
    assert snap.instances == made
    # 302 counts in 4 transactions, then 630 keys of 301 services in 4 (100 ranges at most);
    # one request a service was 302
    assert spent == 8, spent


def test_services_read_at_a_compacted_revision_are_read_again(
        etcd_url: str, raw: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The transactions after the counts read at the counts' revision (etcd honours it inside
    a transaction): once compacted, the read starts again and is consistent at a new one."""
    url = RegistryURL.parse(etcd_url)
    made = {x.key: x for x in (inst(n, f"s{n % 5}") for n in range(20))}
    write(raw, {url.key(*k): x.to_json() for k, x in made.items()})
    extra = inst(1000, "s1")
    reg = open_registry(etcd_url)
    try:
        client = CompactsAfterFirstRequest(reg.client, raw, url.key(*extra.key),
                                          extra.to_json())
        with caplog.at_level(logging.WARNING, logger="discovery.registry.etcd_read"):
            snap = read_snapshot(plain_call, client, plain_decode, url.services_root + "/",
                                 services=[f"s{n}" for n in range(5)])
    finally:
        reg.close(revoke=False)
    assert "compacted" in caplog.text
    assert snap.revision >= client.compacted > 0
    assert snap.instances == {**made, extra.key: extra}
    assert client.requests == 1 + 2  # the aborted read's counts, then counts and one read


def test_a_watch_resuming_past_values_over_its_receive_limit_reads_again(
        etcd_url: str, raw: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stream broken while big values are written: etcd answers the resume with one message
    of up to 1,000 revisions, over the channel's receive limit (RESOURCE_EXHAUSTED; 64 MiB in
    use, ~45 values of 1.5 MiB; here 256 KiB and 12 of 100 KB). Resumed from the same revision,
    it failed so forever, the registry flapping down and up; it reads everything once (paged:
    each value fits) and watches on from that read's revision."""
    limit = 256 * 1024
    monkeypatch.setattr(etcd_aio, "GRPC_OPTIONS", [
        (k, limit if k == "grpc.max_receive_message_length" else v)
        for k, v in etcd_aio.GRPC_OPTIONS])
    starts: list[int] = []
    create = etcd_watch.EtcdWatch._create

    def counted(self: etcd_watch.EtcdWatch, rng: str) -> Any:
        req = create(self, rng)
        starts.append(int(req.create_request.start_revision))
        return req

    monkeypatch.setattr(etcd_watch.EtcdWatch, "_create", counted)
    url = RegistryURL.parse(etcd_url)
    proxy = TcpProxy(url.hosts[0])
    reg = open_registry(proxy.url("etcd", url.prefix) + "?spread=0.5", timeout=5)
    seen: list[Change] = []
    states: list[bool] = []
    try:
        reg.add_state_listener(states.append)
        reg.watch(seen.append, reg.snapshot().revision)
        raw.put(url.key(*inst(1).key), inst(1).to_json())
        wait_for(lambda: [c.kind for c in seen] == ["put"], 10, message="the first put")
        resume = seen[0].revision + 1
        with proxy.blocked():
            wait_for(lambda: states[-1:] == [False], 10, message="the link seen down")
            for _ in range(12):  # a key outside the instances' shape: read, never decoded
                raw.put(url.services_root + "/junk/blob", b"x" * 100_000)
            raw.put(url.key(*inst(2).key), inst(2).to_json())
        before, t0 = reg.reads.counts(), time.monotonic()
        with caplog.at_level(logging.WARNING, logger=etcd_watch.__name__):
            wait_for(lambda: seen[-1].kind == "reset" and len(seen[-1].snapshot.instances) == 2,
                     5, message="the read after the resume over the limit")
            read_in, t1 = time.monotonic() - t0, time.monotonic()
            raw.put(url.key(*inst(3).key), inst(3).to_json())
            wait_for(lambda: seen[-1].kind == "put", 1, message="a put after it")
        print(f"read again {read_in:.2f} s after the link came back, the put after it in "
              f"{time.monotonic() - t1:.3f} s; creates {starts}")
        assert [c.kind for c in seen] == ["put", "reset", "put"], seen
        assert starts.count(resume) == 1, starts  # that resume: not asked for again
        assert (reg.reads.counts() - before).full_reads == 1
        assert states[-1] and states.count(False) == 1, states  # down for the cut only
        assert caplog.text.count("over the receive limit") == 1, caplog.text
    finally:
        reg.close(revoke=False)
        proxy.close()
