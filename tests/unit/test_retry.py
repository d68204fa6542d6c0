"""discovery.retry: the one retry policy (backoff with jitter, poll), stop-event aware."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import pytest

from discovery.retry import RetryAt, backoff, backoff_async, poll, spread


class Flaky:
    def __init__(self, failures: int, exc: type[Exception] = ConnectionError) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return "ok"


def test_backoff_retries_until_success_and_logs_each_retry(caplog) -> None:
    flaky = Flaky(3)
    with caplog.at_level(logging.WARNING, logger="discovery.retry"):
        for attempt in backoff(ConnectionError, initial=0.001, maximum=0.002, jitter=0.001,
                               what="thing"):
            with attempt:
                result = flaky()
    assert (result, flaky.calls) == ("ok", 4)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"thing: failure {n}" for n in (1, 2, 3)]


def test_backoff_does_not_retry_other_errors() -> None:
    flaky = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        for attempt in backoff(ConnectionError, initial=0.001):
            with attempt:
                flaky()
    assert flaky.calls == 1


def test_backoff_gives_up_after_timeout_with_the_last_error() -> None:
    flaky = Flaky(10**6)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="failure"):
        for attempt in backoff(ConnectionError, timeout=0.2, initial=0.01, maximum=0.02,
                               jitter=0):
            with attempt:
                flaky()
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert flaky.calls >= 5


def test_stop_event_cuts_a_long_backoff_short() -> None:
    stop = threading.Event()
    flaky = Flaky(10**6)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        for attempt in backoff(ConnectionError, stop_event=stop, initial=30, maximum=30):
            with attempt:
                flaky()
    assert time.monotonic() - t0 < 2.0  # not the 30 s wait
    assert flaky.calls == 1  # and no attempt after the stop: it gives up with the last error


def test_backoff_async_retries_a_coroutine_and_a_cancel_ends_its_wait() -> None:
    flaky = Flaky(2)

    async def retried() -> str:
        async for attempt in backoff_async(ConnectionError, initial=0.001, maximum=0.002):
            with attempt:
                return flaky()
        raise AssertionError("unreachable")

    assert (asyncio.run(retried()), flaky.calls) == ("ok", 3)

    async def cancelled() -> float:
        failing = Flaky(10**6)

        async def forever() -> None:
            async for attempt in backoff_async(ConnectionError, initial=30, maximum=30):
                with attempt:
                    failing()

        task = asyncio.create_task(forever())
        await asyncio.sleep(0.05)
        assert failing.calls == 1  # in its 30 s wait
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert asyncio.run(cancelled()) < 1.0


def test_jitter_spreads_the_waits() -> None:
    waits = set()
    for _ in range(20):
        retrying = backoff(ConnectionError, initial=0.1, maximum=0.1, jitter=0.5)
        state = type("S", (), {"attempt_number": 1, "outcome": None})()
        waits.add(round(retrying.wait(state), 3))  # type: ignore[arg-type]
    assert len(waits) > 10 and all(0.1 <= w <= 0.1 + 0.05 + 0.5 for w in waits)


def test_backoff_grows_to_its_maximum_then_stays_spread_by_its_jitter() -> None:
    """Waits double from ``initial`` to ``maximum``, each plus up to half of it and
    ``jitter`` at random: a fleet that lost its registry retries spread out, never busily."""
    retrying = backoff(ConnectionError, initial=0.1, maximum=1.5, jitter=3.0)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.5), (12, 1.5)]:
        state = type("S", (), {"attempt_number": attempt, "outcome": None})()
        waits = [retrying.wait(state) for _ in range(200)]
        assert all(base <= w <= base * 1.5 + 3.0 for w in waits), (attempt, min(waits),
                                                                    max(waits))
        assert max(waits) - min(waits) > 2.0  # spread over (nearly) the whole jitter


def test_at_the_cap_a_fleets_retries_stay_spread() -> None:
    """1,000 hosts that failed together, at the 5 s cap of the default backoff: their next
    tries spread over more than 2 s (with 0 to 0.2 s added, 90 % came within 1 s)."""
    retrying = backoff(ConnectionError)
    state = type("S", (), {"attempt_number": 20, "outcome": None})()
    waits = sorted(retrying.wait(state) for _ in range(1000))  # type: ignore[arg-type]
    assert waits[0] >= 5.0 and waits[-1] <= 5.0 + 2.5 + 0.2
    assert waits[950] - waits[50] > 2.0


def test_spread_is_uniform_over_its_window() -> None:
    delays = [spread(3.0) for _ in range(2000)]
    assert all(0 <= d < 3.0 for d in delays)
    assert [sum(1 for d in delays if k <= d < k + 1) for k in range(3)] == pytest.approx(
        [667, 667, 667], abs=120)
    assert spread(0) == 0 and spread(-1) == 0


def test_poll_returns_the_first_truthy_value_or_the_last_falsy_one() -> None:
    values = iter([0, None, "", "yes", "later"])
    assert poll(lambda: next(values), timeout=5, interval=0.001) == "yes"
    t0 = time.monotonic()
    assert poll(lambda: 0, timeout=0.1, interval=0.01) == 0
    assert 0.1 <= time.monotonic() - t0 < 1.0


def test_retry_at_doubles_while_failing_and_starts_again_after_success() -> None:
    later = RetryAt(initial=1.0, maximum=4.0)
    assert not later.taken() and later.due == 0.0  # nothing failed: nothing due
    assert [later.failed() for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert not later.taken()  # due in 4 s, not now
    later.due = time.monotonic() - 0.01  # as if the wait were over
    assert later.taken() and later.due == 0.0 and not later.taken()  # taken once
    assert later.failed() == 4.0  # the wait kept for the doubling
    later.succeeded()
    assert later.failed() == 1.0


def test_retry_at_jitters_within_its_maximum_and_is_held_or_hurried() -> None:
    later = RetryAt(initial=1.0, maximum=4.0)
    delays = [later.failed(jitter=0.25) for _ in range(4)]
    assert 0.75 <= delays[0] <= 1.25 and 1.5 <= delays[1] <= 2.5
    assert all(3.0 <= d <= 4.0 for d in delays[2:])  # ± a quarter, never past the maximum
    assert later.wait == 4.0 and later.due <= time.monotonic() + 4.0
    assert 0.0 < (later.remaining() or 0.0) <= 4.0  # a loop sleeps at most this long
    later.hold()  # until told: not due, however long it waits
    assert later.due == math.inf and not later.taken() and later.remaining() is None
    later.now()  # the cause went away: due at once, its wait kept
    assert later.due == 0.0 and later.wait == 4.0 and later.remaining() is None
    later.due = time.monotonic() - 1.0
    assert later.remaining() == 0.0  # overdue: now
    assert later.failed() == 4.0
