"""ZooKeeper reconnects: one quick retry (another member), then a random phase within the window,
kept: a fleet whose ensemble comes back reconnects at an even rate over the window."""

from __future__ import annotations

import itertools
import random

import pytest
from kazoo.retry import ForceRetryError
from kazoo.retry import InterruptedError as RetryInterrupted

from discovery.registry import RegistryURL, zk_reconnect
from discovery.registry.zk import ZkRegistry
from discovery.registry.zk_reconnect import FIRST, ReconnectSchedule, window


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


def test_a_fleet_comes_back_evenly_over_the_window() -> None:
    """2,000 hosts lose the ensemble at 0; it serves again at ``back``. Each host's first attempt
    from then on lands anywhere in the window after ``back`` alike: about a third of them in
    each third. (A random wait within the window after every failure put 56 % in the first.)"""
    rng = random.Random(7)
    random.seed(7)
    schedule = ReconnectSchedule(3.0)
    for back in (0.5, 1.6, 4.0, 9.3):
        arrivals = []
        for _ in range(2000):
            t, failed = 0.0, 0
            while t < back:
                failed += 1
                t += schedule.wait(failed) + rng.uniform(0, 0.002)  # the attempt itself
            arrivals.append(t - back)
        assert max(arrivals) <= 3.0 + FIRST + 0.01
        thirds = [sum(1 for a in arrivals if k <= a < k + 1) / len(arrivals) for k in (0, 1, 2)]
        assert all(0.28 < share < 0.39 for share in thirds), (back, thirds)


def test_the_window_stays_below_a_third_of_the_session_timeout() -> None:
    assert window(RegistryURL.parse("zk://h/p?spread=30"), 6) == 2.0
    assert window(RegistryURL.parse("zk://h/p?spread=0"), 10) == 0.1  # no window: 0.1 s apart


def test_call_retries_on_the_schedule_until_it_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(zk_reconnect.time, "monotonic", clock.monotonic)
    schedule = ReconnectSchedule(2.0).copy()  # kazoo's connection loop runs a copy
    schedule.sleep_func = clock.sleep
    tries: list[float] = []

    def attempt() -> str:
        tries.append(clock.now)
        if len(tries) < 5:
            raise ForceRetryError()
        return "connected"

    assert schedule(attempt) == "connected"
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert len(gaps) == 4
    assert gaps[0] <= FIRST + 1e-9 and gaps[1] <= 2.0 + 1e-9
    assert gaps[2:] == pytest.approx([2.0, 2.0])


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
        running = installed.copy()  # what kazoo's connection loop runs
        assert type(running) is ReconnectSchedule and running.window == 2.0
        assert running.interrupt() is reg.client._stopped.is_set()
    finally:
        reg.close()
