"""ZooKeeper reconnects: one quick retry (another member), then a random phase within the
window, kept, so a fleet whose ensemble comes back reconnects at an even rate over the window;
and the re-registration after a session expiry, retried with growing, jittered waits."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kazoo.exceptions import ConnectionClosedError
from kazoo.retry import ForceRetryError
from kazoo.retry import InterruptedError as RetryInterrupted

from discovery.errors import RegistryUnavailable
from discovery.model import Instance
from discovery.registry import RegistryURL, zk_reconnect
from discovery.registry.zk import ZkRegistry
from discovery.registry.zk_reconnect import FIRST, ReconnectSchedule, install_schedule, window


class Clock:
    """time.monotonic and a sleep that advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_first_at_once_then_on_the_hosts_turns_one_window_apart() -> None:
    schedule = ReconnectSchedule(window(RegistryURL.parse("zk://h/p?spread=3"), 10), phase=1.0)
    assert schedule.window == 3.0
    assert all(0 <= schedule.wait(1, now) <= FIRST for now in (0.0, 0.5, 7.3))
    assert schedule.wait(2, 0.5) == pytest.approx(0.5)  # its turns: 1, 4, 7, ...
    assert schedule.wait(3, 1.0) == pytest.approx(3.0)
    assert schedule.wait(3, 5.2) == pytest.approx(1.8)  # however long the attempt took
    assert schedule.copy().phase == 1.0  # kazoo's connection loop runs a copy
    phases = [ReconnectSchedule(3.0).phase for _ in range(400)]
    assert all(0 <= p <= 3.0 for p in phases)
    assert min(phases) < 0.3 and max(phases) > 2.7  # over the whole window


def arrivals(make: Callable[[], ReconnectSchedule], back: float, listening: tuple[float, float],
             hosts: int, rng: random.Random) -> list[float]:
    """When each of ``hosts`` that lost the ensemble at 0 first tries once it serves at ``back``,
    seconds after ``back``. An attempt made within ``listening`` (a member that listens before
    it has read its data) waits unanswered until its end, then fails; one before or after it
    fails at once."""
    out = []
    for _ in range(hosts):
        schedule, t, failed = make(), 0.0, 0
        while True:
            failed += 1
            t += schedule.wait(failed, t)
            if t >= back:
                break
            t = max(t, listening[1]) if listening[0] <= t < listening[1] else t
            t += rng.uniform(0, 0.002)  # the attempt itself
        out.append(t - back)
    return out


def thirds(came: list[float]) -> list[float]:
    return [sum(1 for a in came if k <= a < k + 1) / len(came) for k in (0, 1, 2)]


def test_a_fleet_comes_back_evenly_over_the_window() -> None:
    """2,000 hosts lose the ensemble at 0; it serves again at ``back``. Each host's next attempt
    from then on lands anywhere in the window after ``back`` alike: about a third of them in
    each third, also when attempts ended together at a member that listened before it read
    its data. Two policies before fail it, so the test can tell: a new random wait within the
    window after each failure put more than half of the hosts in the first third; turns
    counted from the end of the last attempt keep the hosts whose attempts ended together in
    step (``ca01db2``)."""
    rng = random.Random(7)
    state = random.getstate()
    random.seed(7)  # the schedule's own draws (discovery.retry.spread)
    try:
        for back, listening in ((0.5, (0, 0)), (1.6, (0, 0)), (4.0, (0.6, 1.8)),
                                (9.3, (0.6, 1.8)), (2.5, (0.6, 1.8))):
            came = arrivals(lambda: ReconnectSchedule(3.0), back, listening, 2000, rng)
            assert max(came) <= 3.0 + FIRST + 0.01
            assert all(0.28 < share < 0.39 for share in thirds(came)), (back, thirds(came))

        class EveryTimeAtRandom(ReconnectSchedule):
            def wait(self, failed: int, now: float) -> float:
                return super().wait(1, now) if failed <= 1 else rng.uniform(0, self.window)

        came = arrivals(lambda: EveryTimeAtRandom(3.0), 9.3, (0, 0), 2000, rng)
        assert thirds(came)[0] > 0.5

        class FromTheEnd(ReconnectSchedule):  # ca01db2's
            def wait(self, failed: int, now: float) -> float:
                if failed <= 2:
                    return super().wait(1, now) if failed == 1 else rng.uniform(0, self.window)
                return self.window

        came = arrivals(lambda: FromTheEnd(3.0), 2.5, (0.6, 1.8), 2000, rng)
        assert max(thirds(came)) > 0.5, thirds(came)
    finally:
        random.setstate(state)


def test_the_window_stays_below_a_third_of_the_session_timeout() -> None:
    assert window(RegistryURL.parse("zk://h/p?spread=30"), 6) == 2.0
    assert window(RegistryURL.parse("zk://h/p?spread=0"), 10) == 0.1  # no window: 0.1 s apart


def run(schedule: ReconnectSchedule, clock: Clock, outcomes: list[str]) -> list[float]:
    """Call ``schedule`` with attempts that each ``fail`` at once, or ``connect`` (as kazoo's
    does: ``reset()``) and are lost 60 s later; then one connects for good. The moments the
    attempts began."""
    tries: list[float] = []

    def attempt() -> str:
        tries.append(clock.now)
        if len(tries) > len(outcomes):
            return "connected"
        if outcomes[len(tries) - 1] == "connect":
            schedule.reset()
            clock.now += 60.0
        raise ForceRetryError()

    assert schedule(attempt) == "connected"
    assert len(tries) == len(outcomes) + 1
    return tries


def test_call_retries_on_the_schedule_until_it_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(zk_reconnect.time, "monotonic", clock.monotonic)
    schedule = ReconnectSchedule(2.0, phase=0.5)
    schedule.sleep_func = clock.sleep
    schedule = schedule.copy()  # kazoo's connection loop runs a copy
    assert schedule.sleep_func == clock.sleep  # or the wait below would be the real one
    tries = run(schedule, clock, ["fail"] * 4)
    assert tries[1] <= FIRST + 1e-9
    assert tries[2:] == pytest.approx([0.5, 2.5, 4.5])  # its turns


def test_a_connection_lost_later_is_retried_at_once_then_on_its_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(zk_reconnect.time, "monotonic", clock.monotonic)
    schedule = ReconnectSchedule(3.0, phase=1.0)
    schedule.sleep_func = clock.sleep
    tries = run(schedule, clock, ["fail", "fail", "fail", "connect", "fail", "fail"])
    assert tries[2:4] == pytest.approx([1.0, 4.0])  # its turns while the ensemble is down
    assert 64.0 <= tries[4] <= 64.0 + FIRST + 1e-9  # lost after 60 s: at once
    assert tries[5:] == pytest.approx([67.0, 70.0])  # then its turns again


def test_a_closed_client_is_not_retried() -> None:
    """kazoo's ConnectionClosedError is a SessionExpiredError, which kazoo retries elsewhere:
    the schedule must let it through at once, as kazoo's own retry does."""
    schedule = ReconnectSchedule(3.0)

    def sleep(seconds: float) -> None:
        raise AssertionError("a closed client was retried")

    schedule.sleep_func = sleep
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise ConnectionClosedError()

    with pytest.raises(ConnectionClosedError):
        schedule(attempt)
    assert calls == [1]


def test_a_stopped_client_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(zk_reconnect.time, "monotonic", clock.monotonic)
    schedule = ReconnectSchedule(3.0, interrupt=lambda: clock.now >= 4.0)
    schedule.sleep_func = clock.sleep

    def attempt() -> None:
        raise ForceRetryError()

    with pytest.raises(RetryInterrupted):
        schedule(attempt)
    assert 4.0 <= clock.now <= 4.0 + zk_reconnect._TICK + 1e-9


def test_the_registry_client_reconnects_on_the_schedule() -> None:
    reg = ZkRegistry(RegistryURL.parse("zk://127.0.0.1:1/p?spread=2"), ttl=9)  # not connected
    try:
        installed = reg.client._connection.retry_sleeper
        assert type(installed) is ReconnectSchedule and installed.window == 2.0

        def sleep(seconds: float) -> None:
            pass

        installed.sleep_func = sleep
        running = installed.copy()  # what kazoo's connection loop runs
        assert type(running) is ReconnectSchedule and running.window == 2.0
        assert running.sleep_func is sleep
        assert running.interrupt is not None
        stopped = reg.client._stopped
        was = stopped.is_set()
        stopped.set()
        assert running.interrupt() is True
        stopped.clear()
        assert running.interrupt() is False
        if was:
            stopped.set()
    finally:
        reg.close()


def test_an_unknown_kazoo_is_refused() -> None:
    """The schedule replaces an attribute of kazoo's connection: a release without it must
    fail loudly, not leave the client on kazoo's own policy."""
    class Client:
        _connection = object()
        _stopped = threading.Event()

    with pytest.raises(TypeError, match="retry_sleeper"):
        install_schedule(Client(), RegistryURL.parse("zk://h/p"), 10.0)


def test_re_registering_after_an_expiry_retries_apart_until_done() -> None:
    """A fleet whose sessions expired together must not retry in step: the waits between tries
    grow from 0.5 s, each with up to 0.5 s at random; a success ends it, closing stops it."""
    reg = ZkRegistry(RegistryURL.parse("zk://127.0.0.1:1/p"), ttl=2.0, timeout=0.2)  # nobody
    try:
        inst = Instance(service="web", id="h1:000000000001:80", node="h1",
                        address="127.0.0.1", port=8001)
        reg._owned[inst.key] = inst
        tries: list[float] = []

        def op(what: str, fn: Callable[[], Any]) -> list[Instance]:
            tries.append(time.monotonic())
            if len(tries) < 3:
                raise RegistryUnavailable(f"{what}: not connected")
            return []  # every instance written

        reg._op = op  # type: ignore[method-assign,assignment]
        reg._recover()
        assert len(tries) == 3
        first, second = tries[1] - tries[0], tries[2] - tries[1]
        assert 0.5 <= first <= 1.0 + 0.1 and 1.0 <= second <= 1.5 + 0.1, (first, second)

        tries.clear()
        reg._closing.set()
        reg._recover()  # closing: at most the one try, which the closed registry refuses
        assert len(tries) <= 1
    finally:
        reg.close()
