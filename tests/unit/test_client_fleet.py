"""The client at fleet scale (issue 11): its live catalog has the wipe guard, timed apart from
the callbacks (a registry-side wipe emptied it in every process of the fleet at once), it
follows only the services it is asked about (it read and followed the whole registry whatever
it watched) and reads them outside the lock its watch applies changes under, and a burst of
changes makes one call with the newest list (it computed and queued a list per change).
A registry that hands changes over on demand: client logic, no server."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import pytest

from discovery.client import Client
from discovery.model import Instance
from discovery.registry import RegistryURL, Snapshot
from discovery.registry.base import Change
from tests.harness.client_calls import Recorder, inst, ports
from tests.unit.test_client_reset import FakeRegistry

URL = RegistryURL.parse("etcd://127.0.0.1:1/x")


def fleet(services: int = 20) -> Snapshot:
    """``services`` services of 3 instances, on 3 hosts."""
    members = [Instance(service=f"s{s:02d}", id=f"h{k}:{s * 3 + k:012x}:80", node=f"h{k}",
                        address="127.0.0.1", port=8000 + s * 3 + k)
               for s in range(services) for k in range(3)]
    return Snapshot({i.key: i for i in members}, revision=10)


def opened(monkeypatch: pytest.MonkeyPatch, snap: Snapshot) -> FakeRegistry:
    fake = FakeRegistry(URL, snap)
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: fake)
    return fake


def until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``check`` holds (polled); fails past ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - start


def push(fake: FakeRegistry, change: Change) -> None:
    assert fake.callback is not None
    fake.callback(change)


@pytest.mark.parametrize("guard", [True, False])
def test_a_wipe_does_not_empty_the_clients_catalog(monkeypatch: pytest.MonkeyPatch,
                                                   guard: bool) -> None:
    snap = fleet()
    fake = opened(monkeypatch, snap)
    with Client(URL, wipe_guard=guard) as client:
        client.follow()
        # an empty backup restored: the watch reads it again, nothing there (a reset)
        push(fake, Change("reset", snapshot=Snapshot({}, revision=11), revision=11))
        time.sleep(0.5)  # past the guard's settle (0.2 s): what it would let go is gone
        left = sum(len(client.instances(f"s{s:02d}")) for s in range(20))
        if not guard:  # the baseline: every process of the fleet empty at once
            assert left == 0
            return
        assert client._live._guard is not None and client._live._guard.status.engaged == 1
        assert left >= 30 and all(client.instances(f"s{s:02d}") for s in range(20))
        assert client.pick("s07").service == "s07"
        dead = snap.instances[("s15", "h0:00000000002d:80")]
        for member in snap.instances.values():  # the agents come back, but one instance
            if member is not dead:
                push(fake, Change("put", key=member.key, instance=member, revision=12))
        assert len(client.instances("s07")) == 3
        # the wipe is over (no removal for 2 s) and s15 has 2 others up: the dead one goes,
        # within a second of that (the guard's timer looks at least once a second while it
        # holds anything: no deadline of its own falls there; it stayed 30 s)
        took = until(lambda: len(client.instances("s15")) == 2)
        assert took < 2.0 + 1.5, took


def test_a_last_instance_goes_once_removals_pause_even_while_a_callback_blocks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    snap = fleet(4)
    fake = opened(monkeypatch, snap)
    release = threading.Event()
    with Client(URL) as client:
        client.follow()
        client.watch("s00", lambda _: release.wait(10))  # holds the callback thread
        gone = [i for i in snap.instances.values() if i.service == "s01"]
        start = time.monotonic()
        for member in gone:  # a service's instances deleted by hand: 3 of 12, no wipe
            push(fake, Change("delete", key=member.key, revision=11))
        assert len(client.instances("s01")) == 1  # its last: settling
        until(lambda: not client.instances("s01"))
        took = time.monotonic() - start
        release.set()
    # three nodes' removals: it waits for them to pause for ``window`` (2 s), not ``settle``
    # (more may come: a wipe is seen only at half the catalog); one node's settle in 0.2 s
    assert 2.0 <= took < 3.0, took


def test_a_watch_follows_its_service_only(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = fleet()
    fake = opened(monkeypatch, snap)
    calls = Recorder()
    with Client(URL) as client:
        client.watch("s01", calls)
        assert calls.wait(1) == [[8003, 8004, 8005]]
        assert fake.asked == [frozenset({"s01"})]  # not the whole registry
        assert client._live.catalog is not None and client._live.catalog.size() == 3
        assert ports(client.instances("s02")) == [8006, 8007, 8008]  # read: that one only
        assert fake.asked[-1] == frozenset({"s02"})
        more = Recorder()
        client.watch("s03", more)  # the two read together, then watched together
        assert more.wait(1) == [[8009, 8010, 8011]]
        assert fake.asked[-1] == frozenset({"s01", "s03"})
        assert client._live.catalog.size() == 6 and calls.calls == [[8003, 8004, 8005]]
        client.follow()  # now everything
        assert fake.asked[-1] is None and client._live.catalog.size() == 60
        assert client.services() == sorted({k[0] for k in snap.instances})


def test_services_added_at_once_from_two_threads_are_both_followed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each added service reads the followed ones again, one at a time: no read of an older
    set lands after a newer one (a stale reset emptied a service just added)."""
    snap = fleet()
    fake = opened(monkeypatch, snap)
    read = fake.snapshot
    reads, second, order = itertools.count(), threading.Event(), []

    def slow(services: Collection[str] | None = None) -> Snapshot:
        n = next(reads)  # 0: s01's; 1 and 2: the two threads'
        order.append(f"start {n}")
        if n == 1:  # a read that could start meanwhile would land first, this one after it
            second.wait(0.5)  # an absence window: none may start
        elif n == 2:
            second.set()
        order.append(f"end {n}")
        return read(services)

    fake.snapshot = slow  # type: ignore[method-assign]
    seen: dict[str, Recorder] = {s: Recorder() for s in ("s01", "s02", "s03")}
    with Client(URL) as client:
        client.watch("s01", seen["s01"])
        threads = [threading.Thread(target=client.watch, args=(s, seen[s]))
                   for s in ("s02", "s03")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert order[2:] == ["start 1", "end 1", "start 2", "end 2"], order  # one at a time
        assert client._live.services == frozenset({"s01", "s02", "s03"})
        for name, rec in seen.items():
            rec.wait(1)
            assert all(len(call) == 3 for call in rec.calls), (name, rec.calls)
        assert client._live.catalog is not None and client._live.catalog.size() == 9


def test_a_read_that_fails_leaves_the_followed_services_followed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from discovery.errors import RegistryUnavailable

    fake = opened(monkeypatch, fleet())
    with Client(URL) as client:
        client.follow("s01")

        def down(services: Collection[str] | None = None) -> Snapshot:
            raise RegistryUnavailable("no member answered")

        fake.snapshot = down  # type: ignore[method-assign]
        with pytest.raises(RegistryUnavailable):
            client.follow("s02")
        assert client._live.services == frozenset({"s01"})
        new = Instance(service="s01", id="h9:000000000099:80", node="h9",
                       address="127.0.0.1", port=9999)
        push(fake, Change("put", key=new.key, instance=new, revision=20))  # resumed
        assert len(client.instances("s01")) == 4


def test_a_burst_of_changes_makes_one_call_with_the_newest_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = opened(monkeypatch, Snapshot({inst("web", 1).key: inst("web", 1)}, revision=10))
    entered, release = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def slow(instances: list[Any]) -> None:
        calls.append(ports(instances))
        if len(calls) == 1:
            entered.set()
            release.wait(5)

    with Client(URL) as client:
        client.watch("web", slow)
        assert entered.wait(5)  # the first call runs; 500 changes come meanwhile
        for n in range(2, 502):
            push(fake, Change("put", key=inst("web", n).key, instance=inst("web", n),
                              revision=10 + n))
        assert client._queue.qsize() <= 1  # not a list queued a change
        release.set()
        until(lambda: len(calls) >= 2)
        time.sleep(0.2)  # an absence window: no further call for the same list
    assert len(calls) == 2 and calls[1] == list(range(8001, 8502))


def test_a_service_watched_during_a_wipe_does_not_empty_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Watching one more service reads those followed again: a read of the wiped registry is
    a reset like any other, held by the guard (it was applied around it: every held instance
    gone at once)."""
    snap = fleet()
    fake = opened(monkeypatch, snap)
    with Client(URL) as client:
        client.follow(*sorted({k[0] for k in snap.instances}))
        push(fake, Change("reset", snapshot=Snapshot({}, revision=11), revision=11))
        fake.snap = Snapshot({}, revision=12)  # the registry still empty
        client.watch("new", lambda _: None)
        assert fake.asked[-1] is not None and "new" in fake.asked[-1]
        time.sleep(0.5)  # past the guard's settle
        assert all(len(client.instances(f"s{s:02d}")) == 3 for s in range(20))
