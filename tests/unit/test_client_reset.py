"""The client's catalog on a ``reset`` (the backend could not resume its watch), with a
registry that hands one over on demand: pure client logic, no server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import pytest

from discovery.client import Client
from discovery.errors import RegistryUnavailable
from discovery.registry import RegistryURL, Snapshot
from discovery.registry.base import Change, read_first
from discovery.registry.reads import ReadStats
from tests.harness.client_calls import Recorder, inst, ports
from tests.harness.scripted import ScriptedRegistry


class FakeRegistry:
    """Just enough of a Registry to hand the client a ``reset`` on demand."""

    invalid_records = 0

    def __init__(self, url: RegistryURL, snapshot: Snapshot) -> None:
        self.url, self.snap, self.reads = url, snapshot, ReadStats()
        self.callback: Callable[[Change], None] | None = None
        self.closed = False
        self.asked: list[frozenset[str] | None] = []  # the services each snapshot was of

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        self.asked.append(None if services is None else frozenset(services))
        return replace(self.snap, instances={k: i for k, i in self.snap.instances.items()
                                             if services is None or k[0] in services})

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Collection[str] | None = None) -> Any:
        read_first(start_revision, lambda: self.snapshot(services), callback)  # the client's
        self.callback = callback
        fake = self

        class Handle:  # stopping an older watch leaves the newest one's callback
            def stop(self) -> None:
                if fake.callback is callback:
                    fake.callback = None
        return Handle()

    def close(self, revoke: bool = True) -> None:
        self.closed = True


def test_reset_replaces_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    url = RegistryURL.parse("etcd://127.0.0.1:1/x")
    start = Snapshot({i.key: i for i in (inst("web", 1), inst("web", 2))}, revision=10)
    fake = FakeRegistry(url, start)
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: fake)
    calls = Recorder()
    with Client(url) as client:
        client.follow()  # every service
        client.watch("web", calls)
        assert calls.wait(1) == [[8001, 8002]]
        assert fake.callback is not None
        new = Snapshot({i.key: i for i in (inst("web", 2), inst("web", 3))}, revision=99)
        fake.callback(Change("reset", snapshot=new, revision=99))
        assert calls.wait(2)[-1] == [8002, 8003]
        assert ports(client.instances("web")) == [8002, 8003]
        fake.callback(Change("reset", snapshot=new, revision=100))  # same list: no call
        again = replace(inst("web", 3), registered_at=1.0)  # re-written, nothing else new
        fake.callback(Change("put", key=again.key, instance=again, revision=101))
        fake.callback(Change("put", key=inst("db", 4).key, instance=inst("db", 4)))
        time.sleep(0.2)  # an absence window: no call for the unchanged "web" list
        assert len(calls.calls) == 2 and client.services() == ["db", "web"]
    assert fake.closed and fake.callback is None


def test_stop_waits_for_a_running_callback_and_none_starts_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = RegistryURL.parse("etcd://127.0.0.1:1/x")
    fake = FakeRegistry(url, Snapshot({inst("web", 1).key: inst("web", 1)}, revision=10))
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: fake)
    entered, release, stopped = threading.Event(), threading.Event(), threading.Event()
    calls: list[tuple[list[int], bool]] = []  # (ports, whether stop() had returned)

    def slow(instances: list[Any]) -> None:
        calls.append((ports(instances), stopped.is_set()))
        if len(calls) == 2:
            entered.set()
            release.wait(5)

    def put(n: int) -> None:
        assert fake.callback is not None
        fake.callback(Change("put", key=inst("web", n).key, instance=inst("web", n)))

    with Client(url) as client:
        handle = client.watch("web", slow)
        deadline = time.monotonic() + 5  # the first call made (changes before it join it)
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls
        put(2)
        assert entered.wait(5)  # the second call is running
        stopper = threading.Thread(target=lambda: (handle.stop(), stopped.set()))
        stopper.start()
        assert not stopped.wait(0.3)  # stop() waits for the running call
        put(3)  # queued meanwhile: delivered before stop() returns, or never
        release.set()
        assert stopped.wait(5)
        stopper.join(5)
        put(4)
        time.sleep(0.2)  # an absence window: nothing runs after stop() returned
        assert [p for p, _ in calls][:2] == [[8001], [8001, 8002]]
        assert not any(after for _, after in calls), calls

    def stop_itself(_: list[Any]) -> None:
        inner.stop()  # from inside the callback: returns at once

    with Client(url) as client:
        inner = client.watch("web", stop_itself)
        deadline = time.monotonic() + 5
        while inner.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not inner.active


def test_a_new_watch_takes_over_at_its_read_and_a_failed_one_leaves_the_old(
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = RegistryURL.parse("etcd://127.0.0.1:1/x")
    start = Snapshot({i.key: i for i in (inst("web", 1), inst("db", 1))}, revision=10)
    fake = ScriptedRegistry(start, str(url))
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: fake)
    with Client(url, wipe_guard=False) as client:
        client.follow("web")
        old = fake.callbacks[0]

        def put_by_the_old_watch() -> None:  # a change the old watch sends during the read
            old(Change("put", key=inst("web", 2).key, instance=inst("web", 2)))
            assert ports(client.instances("web")) == [8001, 8002]  # applied

        fake.during = put_by_the_old_watch
        client.follow("db")
        assert fake.stopped == [0]  # the old watch, stopped within the new one's watch()
        assert ports(client.instances("db")) == [8001]
        old(Change("put", key=inst("web", 3).key, instance=inst("web", 3)))  # too late
        assert ports(client.instances("web")) == [8001]  # the new read, without web 2 or 3

        fake.during, fake.fails = lambda: None, 1
        with pytest.raises(RegistryUnavailable):
            client.follow("api")
        assert fake.stopped == [0] and len(fake.callbacks) == 2  # the current watch runs on
        current = fake.callbacks[1]
        current(Change("put", key=inst("db", 2).key, instance=inst("db", 2)))
        assert ports(client.instances("db")) == [8001, 8002]
        client.follow("api")  # asked again: followed now
        assert fake.stopped == [0, 1] and len(fake.callbacks) == 3


def test_a_callback_raising_a_base_exception_ends_no_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback that raises what is not an ``Exception`` (asyncio's CancelledError from a
    callback that bridges to a loop, SystemExit): it ended the client's one callback thread,
    and no watch of that client was called again, silently."""
    url = RegistryURL.parse("etcd://127.0.0.1:1/x")
    start = Snapshot({i.key: i for i in (inst("web", 1), inst("db", 2))}, revision=10)
    fake = FakeRegistry(url, start)
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: fake)
    web = Recorder()

    def bad(_now: list[Any]) -> None:
        raise SystemExit(1)

    with Client(url) as client:
        client.follow()
        client.watch("db", bad)
        client.watch("web", web)
        assert web.wait(1) == [[8001]]
        assert fake.callback is not None
        fake.callback(Change("put", key=inst("web", 3).key, instance=inst("web", 3),
                             revision=11))
        assert web.wait(2)[-1] == [8001, 8003]  # still called after db's callback raised


def test_a_bug_in_the_guards_round_does_not_end_its_timer() -> None:
    """The client's wipe-guard timer had no guard of its own: a round that raised ended it, and
    what the guard held stayed held for good, silently."""
    from discovery.client_catalog import LiveCatalog

    one = inst("web", 1)
    live = LiveCatalog(ScriptedRegistry(Snapshot({one.key: one}, 1)),  # type: ignore[arg-type]
                       threading.RLock(), lambda touched: None, guarded=True)
    live.follow(None)
    assert live._guard is not None and live._timer is not None
    rounds: list[int] = []
    due = live._guard.due

    def raising_once() -> list[Change]:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("a bug")
        return due()

    live._guard.due = raising_once  # type: ignore[method-assign]
    live._wake.set()
    deadline = time.monotonic() + 5
    while len(rounds) < 2 and time.monotonic() < deadline:
        live._wake.set()
        time.sleep(0.05)
    assert len(rounds) >= 2 and live._timer.is_alive()
    live.close()
