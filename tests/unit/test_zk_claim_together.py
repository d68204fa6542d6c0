"""A new session's instances created again together (``ZkClaims.claim_together``): split by
bytes as well as by count, so that no transaction is over ZooKeeper's ``jute.maxbuffer``
(1 MB by default: the server closes the connection on a larger request; the loss looked
transient, so it was resent for ever and the host's connection dropped every 1-2 s)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kazoo.client import TransactionRequest
from kazoo.exceptions import ConnectionLoss

from discovery.model import Instance
from discovery.registry import RegistryURL, zk_claim
from discovery.registry.zk_claim import ZkClaims
from discovery.registry.zk_index import ZkNodeIndex

URL = RegistryURL.parse("zk://127.0.0.1:2181/discovery")
JUTE_MAXBUFFER = 0xFFFFF
BIG = {f"k{i:02d}": "v" * 512 for i in range(64)}  # ~33.6 KB a record


class Result:
    def __init__(self) -> None:
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class Ensemble:
    """A kazoo client as far as a transaction of creates goes: it answers each, or drops the
    connection (ConnectionLoss) on a request over ``jute.maxbuffer``, as ZooKeeper does."""

    chroot, default_acl, client_id = "", None, (0x1234, b"")
    logger = logging.getLogger("test")

    def __init__(self) -> None:
        self.handler = type("Handler", (), {"async_result": staticmethod(Result)})()
        self.sent: list[tuple[int, int]] = []  # (creates, bytes) of each transaction

    def transaction(self) -> TransactionRequest:
        return TransactionRequest(self)

    def unchroot(self, path: str) -> str:
        return path

    def _call(self, request: Any, result: Result) -> None:
        size = len(request.serialize())
        self.sent.append((len(request.operations), size))
        result.set(ConnectionLoss() if size > JUTE_MAXBUFFER
                   else [op.path for op in request.operations])


def instances(n: int, meta: dict[str, str]) -> list[Instance]:
    return [Instance(service="web", id=f"host1:{i:012x}:8080", node="host1",
                     address="192.0.2.1", port=8080, meta=meta) for i in range(n)]


def claims(zk: Ensemble) -> ZkClaims:
    def get(result: Any) -> Any:
        return result.get()
    index = ZkNodeIndex(zk, URL, get, None, None, None)  # type: ignore[arg-type]
    return ZkClaims(zk, URL, get, index, None, None, "h")


@pytest.mark.parametrize("n", [30, 100])
def test_large_records_go_in_transactions_below_the_servers_limit(n: int) -> None:
    zk = Ensemble()
    owned = instances(n, BIG)
    claimer = claims(zk)
    assert claimer.claim_together(owned) == []  # all created: none left to claim alone
    assert sum(creates for creates, _ in zk.sent) == 2 * n  # each instance and its index node
    assert all(size <= 600 * 1024 for _, size in zk.sent), zk.sent  # 512 KiB + overhead
    assert set(claimer.written) == {inst.key for inst in owned}


def test_small_records_still_go_a_hundred_to_a_transaction() -> None:
    zk = Ensemble()
    assert claims(zk).claim_together(instances(250, {})) == []
    assert [creates for creates, _ in zk.sent] == [200, 200, 100]


def test_an_instance_too_large_for_a_transaction_with_others_goes_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zk_claim, "CLAIM_BYTES", 20_000, raising=False)  # below one BIG
    zk = Ensemble()
    small = instances(5, {})
    big = Instance(service="web", id="host1:0000000000ff:8080", node="host1",
                   address="192.0.2.1", port=8080, meta=BIG)
    assert claims(zk).claim_together([*small[:3], big, *small[3:]]) == []
    assert [creates for creates, _ in zk.sent] == [6, 2, 4]  # before it, it, after it
