"""ZooKeeper reconnects: one quick retry (another member), then a random phase within the
window, kept, so a fleet whose ensemble comes back reconnects at an even rate over the window;
and the re-registration after a session expiry, retried with growing, jittered waits."""

from __future__ import annotations

import itertools
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


def waits(schedule: ReconnectSchedule, attempts: int) -> list[float]:
    return [schedule.wait(n) for n in range(1, attempts + 1)]


def test_first_at_once_then_a_random_phase_then_one_window_apart() -> None:
    schedule = ReconnectSchedule(window(RegistryURL.parse("zk://h/p?spread=3"), 10))
    assert schedule.window == 3.0
    firsts, seconds = [], []
    for _ in range(400):
        first, second, *rest = waits(schedule, 6)
        firsts.append(first)
        seconds.append(second)
        assert rest == [3.0] * 4  # the phase is kept
    assert all(0 <= f <= FIRST for f in firsts)
    assert all(0 <= s <= 3.0 for s in seconds)
    assert min(seconds) < 0.3 and max(seconds) > 2.7  # phases over the whole window


def arrivals(schedule: ReconnectSchedule, back: float, hosts: int,
             rng: random.Random) -> list[float]:
    """When each of ``hosts`` that lost the ensemble at 0 next tries once it serves at
    ``back``, seconds after ``back``."""
    out = []
    for _ in range(hosts):
        t, failed = 0.0, 0
        while t < back:
            failed += 1
            t += schedule.wait(failed) + rng.uniform(0, 0.002)  # the attempt itself
        out.append(t - back)
    return out


def test_a_fleet_comes_back_evenly_over_the_window() -> None:
    """2,000 hosts lose the ensemble at 0; it serves again at ``back``. Each host's next attempt
    from then on lands anywhere in the window after ``back`` alike: about a third of them in
    each third. The policy before (a new random wait within the window after each failure)
    put more than half of them in the first third: checked here too, so the test can tell."""
    rng = random.Random(7)
    state = random.getstate()
    random.seed(7)  # the schedule's own draws (discovery.retry.spread)
    try:
        schedule = ReconnectSchedule(3.0)
        for back in (0.5, 1.6, 4.0, 9.3):
            came = arrivals(schedule, back, 2000, rng)
            assert max(came) <= 3.0 + FIRST + 0.01
            thirds = [sum(1 for a in came if k <= a < k + 1) / len(came) for k in (0, 1, 2)]
            assert all(0.28 < share < 0.39 for share in thirds), (back, thirds)
    finally:
        random.setstate(state)

    class EveryTimeAtRandom(ReconnectSchedule):
        def wait(self, failed: int) -> float:
            return super().wait(1) if failed <= 1 else rng.uniform(0, self.window)

    came = arrivals(EveryTimeAtRandom(3.0), 9.3, 2000, rng)
    assert sum(1 for a in came if a < 1) / len(came) > 0.5


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
    schedule = ReconnectSchedule(2.0)
    schedule.sleep_func = clock.sleep
    schedule = schedule.copy()  # kazoo's connection loop runs a copy
    assert schedule.sleep_func == clock.sleep  # or the wait below would be the real one
    tries = run(schedule, clock, ["fail"] * 4)
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[0] <= FIRST + 1e-9 and gaps[1] <= 2.0 + 1e-9
    assert gaps[2:] == pytest.approx([2.0, 2.0])


def test_a_connection_lost_later_is_retried_at_once_then_on_a_new_phase(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(zk_reconnect.time, "monotonic", clock.monotonic)
    schedule = ReconnectSchedule(3.0)
    schedule.sleep_func = clock.sleep
    tries = run(schedule, clock, ["fail", "fail", "fail", "connect", "fail", "fail"])
    waited = [b - a for a, b in itertools.pairwise(tries)]
    assert waited[2] == pytest.approx(3.0)  # on its phase while the ensemble is down
    assert 60.0 <= waited[3] <= 60.0 + FIRST + 1e-9  # lost after 60 s: at once
    assert waited[4] <= 3.0 + 1e-9 and waited[5] == pytest.approx(3.0)  # a new phase, kept


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
