"""``bench/zk_requests.py``: the fleet bench's count of what its ZooKeeper hosts send, by type
and by moment, and the sums the parent makes of the workers' answers."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness.util import load_script

PATH = Path(__file__).resolve().parents[2] / "bench" / "zk_requests.py"


@pytest.fixture(scope="module")
def zr() -> ModuleType:
    return load_script(PATH)


class Ping:
    pass


class GetData:
    pass


def test_install_counts_every_request_and_still_sends_it(zr: ModuleType) -> None:
    sent: list[tuple[Any, float, int | None]] = []

    class Handler:  # stands in for kazoo's ConnectionHandler
        def _submit(self, request: Any, timeout: float, xid: int | None = None) -> str:
            sent.append((request, timeout, xid))
            return "written"

    clock = [1000.0]
    log = zr.RequestLog(clock=lambda: clock[0])
    zr.install(log, Handler)
    h, ping, get = Handler(), Ping(), GetData()
    assert h._submit(ping, 2.0, -2) == "written"
    clock[0] = 1000.3  # the next bucket
    h._submit(get, 3.0)
    h._submit(get, 3.0, 7)
    assert sent == [(ping, 2.0, -2), (get, 3.0, None), (get, 3.0, 7)]
    assert log.since(0) == [[1000.0, "Ping", 1], [1000.25, "GetData", 2]]
    assert log.since(1000.25) == [[1000.25, "GetData", 2]]  # from its bucket on
    assert log.since(1000.5) == []


def test_kazoo_is_the_default_handler(zr: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from kazoo.protocol.connection import ConnectionHandler

    monkeypatch.setattr(ConnectionHandler, "_submit", ConnectionHandler._submit)  # undone after
    before = ConnectionHandler._submit
    zr.install(zr.RequestLog())
    assert ConnectionHandler._submit is not before


def test_the_workers_answers_add_up(zr: ModuleType) -> None:
    a = [[10.0, "Connect", 2], [10.25, "GetData", 1]]
    b = [[10.0, "Connect", 1], [11.0, "SetWatches", 3]]
    rows = zr.merge([a, b])
    assert rows == [[10.0, "Connect", 3], [10.25, "GetData", 1], [11.0, "SetWatches", 3]]
    assert zr.by_type_between(rows, 10.0, 11.0) == {"Connect": 3, "GetData": 1}
    assert list(zr.by_type_between(rows, 0, 99)) == ["Connect", "SetWatches", "GetData"]
    assert zr.by_type_between(rows, 12.0, 13.0) == {}
    assert zr.per_second(rows, 9.5) == [[0, 4, {"Connect": 3, "GetData": 1}],
                                        [1, 3, {"SetWatches": 3}]]
    assert zr.per_second(rows, 10.5) == [[0, 3, {"SetWatches": 3}]]
