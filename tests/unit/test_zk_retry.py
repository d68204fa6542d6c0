"""ZooKeeper reconnects: one quick retry (another member), then at random within the spread;
and the re-registration after a session expiry, retried with growing, jittered waits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from kazoo.retry import ForceRetryError

from discovery.errors import RegistryUnavailable
from discovery.model import Instance
from discovery.registry import RegistryURL
from discovery.registry.zk import ZkRegistry
from discovery.registry.zk_session import SessionTimeout, connection_retry


def sleeps(url: str, ttl: float, attempts: int = 400) -> list[float]:
    return slept_by(connection_retry(RegistryURL.parse(url), SessionTimeout(ttl, "h")).copy(),
                    attempts)


def slept_by(retry: Any, attempts: int = 400) -> list[float]:
    """The waits of ``retry`` (kazoo's ``KazooRetry``) over ``attempts`` failed attempts."""
    slept: list[float] = []
    retry.sleep_func = slept.append
    left = [attempts]

    def attempt() -> None:
        left[0] -= 1
        if left[0]:
            raise ForceRetryError()

    retry(attempt)
    assert len(slept) == attempts - 1
    return slept


def test_first_retry_at_once_then_spread_over_the_window() -> None:
    first, *rest = sleeps("zk://h/p?spread=3", ttl=10)
    assert 0 <= first <= 0.2
    assert all(0 <= s <= 3.0 for s in rest)
    assert min(rest) < 0.3 and max(rest) > 2.7  # over the whole window, not bunched
    assert 1.2 < sum(rest) / len(rest) < 1.8  # an attempt every 1.5 s on average


def test_the_window_stays_below_a_third_of_the_session_timeout() -> None:
    _, *rest = sleeps("zk://h/p?spread=30", ttl=6)
    assert max(rest) <= 2.0
    _, *rest = sleeps("zk://h/p?spread=0", ttl=10)
    assert max(rest) <= 0.1  # spread=0: no window (at most 0.1 s apart)


def test_the_window_follows_the_session_timeout_the_ensemble_grants() -> None:
    """kazoo's connection loop retries with a copy taken when the client starts, before any
    handshake: the copy follows the timeout granted later (a third of it at most)."""
    session = SessionTimeout(15.0, "h")
    running = connection_retry(RegistryURL.parse("zk://h/p?spread=6"), session).copy()
    _, *rest = slept_by(running)
    assert 4.5 < max(rest) <= 5.0  # a third of the 15 s asked for
    session.granted(9000)  # the member's maxSessionTimeout
    _, *rest = slept_by(running)
    assert 2.7 < max(rest) <= 3.0  # a third of the 9 s granted
    assert running.copy().max_delay == 1.5
    assert session.write_timeout(3) == 3.0  # a request's write: granted over the members


def test_a_granted_timeout_unlike_the_one_asked_is_told_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="discovery.registry.ttl")
    session = SessionTimeout(15.0, "zk1:2181")

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "discovery.registry.ttl"]

    session.granted(15000)
    assert told() == [] and session.seconds == 15.0
    for _ in range(3):
        session.granted(10000)
    assert len(told()) == 1 and session.seconds == 10.0
    assert told()[0].startswith("ZooKeeper at zk1:2181 grants sessions of 10s, not the 15s "
                                "asked for (--ttl): a dead host's instances leave after 10s.")
    session.granted(4000)  # another member, another limit: told too
    assert len(told()) == 2 and session.seconds == 4.0


def test_re_registering_after_an_expiry_retries_apart_until_done() -> None:
    """A fleet whose sessions expired together must not retry in step: the waits between tries
    grow from 0.5 s, each with up to half more and 0.5 s at random; a success ends it, closing
    stops it."""
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
        # (each wait plus up to half of it and up to 0.5 s at random: retry.backoff)
        assert 0.5 <= first <= 1.25 + 0.1 and 1.0 <= second <= 2.0 + 0.1, (first, second)

        tries.clear()
        reg._closing.set()
        reg._recovery.set()  # as close() does: it wakes the recovery, which then stops
        reg._recover()  # closing: at most the one try, which the closed registry refuses
        assert len(tries) <= 1
    finally:
        reg._closing.clear()  # set by hand above: close() would take it as done and leave
        reg.close()  # its client connecting to nobody, logging for the rest of the run
