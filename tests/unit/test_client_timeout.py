"""The client's ``timeout``: a finite number of seconds above 0, refused at once otherwise;
and one deadline for each call, however many requests it makes."""

from __future__ import annotations

import importlib
import math
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from kazoo.handlers.threading import KazooTimeoutError

from discovery.client import Client
from discovery.errors import ConfigError, RegistryUnavailable
from discovery.model import Instance
from discovery.registry.deadline import cut, remaining, within
from discovery.registry.etcd_aio import LoopThread


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 0, 0.0, -1, -0.5, True,
                                 "5", None])
def test_a_timeout_not_a_finite_number_above_0_is_refused(
        bad: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: opened.append(a))
    with pytest.raises(ConfigError, match=r"timeout") as caught:
        Client("etcd://127.0.0.1:1/x", timeout=bad)
    assert repr(bad) in str(caught.value)
    assert not opened  # refused before any connection is made


@pytest.mark.parametrize("good", [0.001, 1, 5.0, 3600])
def test_a_finite_timeout_above_0_is_taken(good: float) -> None:
    with Client("etcd://127.0.0.1:1/x", timeout=good) as client:
        assert client.timeout == good


# -- one deadline a call ----------------------------------------------------------------------
# A read may take several requests (etcd: the keys counted, then read; pages; ZooKeeper: the
# directory, then its listing, then the nodes). The registry's requests are played here on a
# fake clock that only they move: each answers after ``after`` seconds if the time it is
# given allows, else it times out when that time is spent.

T = 1.0  # the client's timeout in these tests


class Clock:
    """``time`` as the modules of discovery see it in the test's thread: only the played
    requests (and a sleep) move it. Every other thread (kazoo's, the asyncio loop's) has the
    real one."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._thread = threading.get_ident()

    def monotonic(self) -> float:
        return self.now if threading.get_ident() == self._thread else time.monotonic()

    def sleep(self, seconds: float) -> None:
        if threading.get_ident() != self._thread:
            return time.sleep(seconds)
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    importlib.import_module("discovery.registry.zk")  # (imported when a client opens one)
    fake = Clock()
    for name, module in list(sys.modules.items()):
        if name.startswith("discovery.") and getattr(module, "time", None) is time:
            monkeypatch.setattr(module, "time", fake)
    return fake


def web(n: int) -> Any:
    i = Instance(service="web", id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                 port=8000 + n)
    return SimpleNamespace(key=f"/x/services/web/{i.id}".encode(), value=i.to_json())


class PlayedEtcd:
    """The etcd member's ``Txn`` and ``Range``: answers in ``after`` s (None: never), in order;
    ``given`` has the time each request was given."""

    def __init__(self, clock: Clock, *after: float | None) -> None:
        self.clock, self.after = clock, list(after)
        self.given: list[float] = []

    async def _answer(self, timeout: float, answer: Any) -> Any:
        self.given.append(timeout)
        after = self.after.pop(0) if self.after else 0.0
        if after is None or after > timeout:
            self.clock.now += timeout
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "Deadline Exceeded")
        self.clock.now += after
        return answer

    async def Txn(self, request: Any, timeout: float, **_: Any) -> Any:
        ops = [op.request_range for op in request.success]
        answers = [SimpleNamespace(count=1, kvs=[] if op.count_only else [web(1)])
                   for op in ops]
        return await self._answer(timeout, SimpleNamespace(
            header=SimpleNamespace(revision=7),
            responses=[SimpleNamespace(response_range=a) for a in answers]))

    async def Range(self, request: Any, timeout: float, **_: Any) -> Any:
        n = 1 if request.key.endswith(b"/") else 2  # the first page, then the next
        return await self._answer(timeout, SimpleNamespace(
            header=SimpleNamespace(revision=7), kvs=[web(n)], more=n == 1, count=2))


def etcd_client(monkeypatch: pytest.MonkeyPatch, member: PlayedEtcd) -> Client:
    client = Client("etcd://127.0.0.1:1/x", timeout=T)  # nothing listens: the member is played
    reg: Any = client._registry
    monkeypatch.setattr(reg.channels, "stub", lambda *_: member)
    return client


CALLS: dict[str, Callable[[Client], object]] = {
    "instances": lambda c: c.instances("web"),
    "pick": lambda c: c.pick("web"),
    "services": lambda c: c.services(),  # the whole prefix: paged
    "follow": lambda c: c.follow("web"),
    "watch": lambda c: c.watch("web", lambda _: None),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_etcd_the_requests_of_one_call_share_its_timeout(
        call: str, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request answers in 0.9 s; the next one would in 0.5 s: past the call's
    timeout, so it is given what remains (0.1 s), and the call fails when that is spent.
    Before, each request had the whole timeout: the call answered after 1.4 s."""
    member = PlayedEtcd(clock, 0.9, 0.5)
    with etcd_client(monkeypatch, member) as client:
        started = clock.now
        with pytest.raises(RegistryUnavailable, match=r"etcd at 127\.0\.0\.1:1: read .* failed"):
            CALLS[call](client)
        assert clock.now - started == pytest.approx(T)
        assert member.given == [pytest.approx(T), pytest.approx(T - 0.9)]
        # the member was not slow: the call's time ran out. It is not taken for a hung one
        reg: Any = client._registry
        assert not any(e.is_failed() for e in reg.client.endpoints.values())
        member.given.clear()  # the next call has a timeout of its own, whole
        member.after = [0.6, 0.3]
        assert [i.port for i in client.instances("web")] == [8001]
        assert member.given == [pytest.approx(T), pytest.approx(T - 0.6)]


class PlayedResult:
    """A kazoo async result that comes ``after`` s (None: never) on the fake clock."""

    def __init__(self, clock: Clock, after: float | None, value: Any,
                 given: list[float | None]) -> None:
        self.clock, self.after, self.value, self.given = clock, after, value, given

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.given.append(timeout)
        if self.after is not None and (timeout is None or self.after <= timeout):
            self.clock.now += self.after
            return self.value
        assert timeout is not None  # (a wait without end: the test would hang)
        self.clock.now += timeout
        raise KazooTimeoutError("played: no answer")


def test_zookeeper_the_requests_of_one_read_share_its_timeout(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The services' directory is there in 0.9 s; the listing of the service's directory
    never comes: it is given what remains (0.1 s), not the whole timeout again."""
    given: list[float | None] = []
    client = Client("zk://127.0.0.1:1/x", timeout=T)  # nothing listens: the ensemble is played
    try:
        reg: Any = client._registry
        reg._connected.set()
        monkeypatch.setattr(reg.client, "exists_async",
                            lambda _path: PlayedResult(clock, 0.9, object(), given))
        monkeypatch.setattr(reg.client, "_call", lambda *_: True)
        monkeypatch.setattr(reg.client.handler, "async_result",
                            lambda: PlayedResult(clock, None, None, given))
        started = clock.now
        with pytest.raises(RegistryUnavailable):
            client.instances("web")
        assert clock.now - started == pytest.approx(T)
        assert given == [pytest.approx(T), pytest.approx(T - 0.9)]
    finally:
        client.close()


def test_a_deadline_is_the_calling_thread_s_alone() -> None:
    """Nested, the sooner one holds; a thread or a task on the registry's loop started in the
    block (a watch's) does not inherit it: spent, it would fail their every request."""
    loop = LoopThread()
    try:
        with within(0.0):
            assert remaining(5.0) == 0.0 and cut(None) == 0.0
            with within(60.0):
                assert remaining(5.0) == 0.0
            seen: list[float] = []
            other = threading.Thread(target=lambda: seen.append(remaining(5.0)))
            other.start()
            other.join()

            async def task() -> float:
                return remaining(5.0)

            assert seen == [5.0] and loop.submit(task()).result(5) == 5.0
        assert remaining(5.0) == 5.0 and cut(None) is None
    finally:
        loop.close()
