"""What a broken etcd watch logs about where it resumes (registry/etcd_refusal.py): the
revision after the last one delivered, or the present when none was delivered yet (a stream
cut before its first answer starts its watchers from now, not from revision 1)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from discovery.errors import RegistryUnavailable
from discovery.registry.etcd_refusal import WatchFailures, over_limit, resuming


def test_resuming_names_the_next_revision_or_the_present() -> None:
    assert resuming(41) == "from revision 42"
    assert resuming(0) == "from the present"


@pytest.mark.parametrize(("revision", "said"), [(0, "resuming from the present"),
                                                (7, "resuming from revision 8")])
def test_a_lost_link_logs_where_the_watch_resumes(
        caplog: pytest.LogCaptureFixture, revision: int, said: str) -> None:
    log = logging.getLogger("test.etcd_watch_log")
    failures = WatchFailures("127.0.0.1:2379", 3.0, log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert failures.interrupted(RegistryUnavailable("gone"), revision)
        assert not failures.interrupted(RegistryUnavailable("gone"), revision)  # logged once
    [record] = caplog.records
    assert said in record.getMessage()
    assert ("revision" in record.getMessage()) == bool(revision)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits WatchFailures asks for, recorded instead of slept."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr("discovery.registry.etcd_refusal.asyncio.sleep", sleep)
    return asked


@pytest.mark.parametrize(("spread", "later", "bounds"), [
    (3.0, None, None),  # the first loss: another member at once; then the backoff's wait
    (3.0, (9.0, 60.0), (9.0, 60.0)),  # a window of its own: every time, the first too
    (0.0, (0.0, 0.0), (0.1, 0.1)),  # never sooner than the backoff's first wait
])
def test_a_watch_with_a_window_of_its_own_resumes_within_it_after_every_loss(
        waits: list[float], caplog: pytest.LogCaptureFixture, spread: float,
        later: tuple[float, float] | None, bounds: tuple[float, float] | None) -> None:
    """etcd_own's stream resumes 3 to 20 resume spreads after each lost link, so that a
    fleet's restart does not re-create every host's own-key watchers within one spread."""
    log = logging.getLogger("test.etcd_watch_later")
    failures = WatchFailures("127.0.0.1:2379", spread, log, later)
    with caplog.at_level(logging.WARNING, logger=log.name):
        answers = [asyncio.run(failures.lost(RegistryUnavailable("gone"), 7))
                   for _ in range(50)]
    [record] = caplog.records  # logged once, with its window
    if bounds is None:
        assert answers == [True] + [False] * 49 and len(waits) == 1 and 0.1 <= waits[0] <= 1.1
        assert "within" not in record.getMessage()
        return
    assert answers == [True] * 50 and len(waits) == 50
    assert all(bounds[0] <= w <= bounds[1] for w in waits), waits
    assert f"within {bounds[0]:g}-{bounds[1]:g} s" in record.getMessage()
    if bounds[0] < bounds[1]:
        assert max(waits) - min(waits) > (bounds[1] - bounds[0]) / 2  # spread, not fixed


def test_a_watch_with_nothing_delivered_yet_resumes_as_every_watch_does(
        waits: list[float]) -> None:
    """Its window is for a stream etcd can replay to (a revision to resume from); one lost
    before its first answer has none, and waits as any other."""
    failures = WatchFailures("127.0.0.1:2379", 3.0, logging.getLogger("t"), (9.0, 60.0))
    answers = [asyncio.run(failures.lost(RegistryUnavailable("gone"), 0)) for _ in range(3)]
    assert answers == [True, False, False] and len(waits) == 1 and 0.1 <= waits[0] <= 1.1


@pytest.mark.parametrize(("spread", "most"), [(3.0, 1.1), (0.6, 0.3), (0.0, 0.1)])
def test_the_first_reconnect_after_a_loss_is_spread(waits: list[float], spread: float,
                                                     most: float) -> None:
    """The hosts of a member that died (a third of the fleet) re-open their streams 0.1 s
    later plus up to a third of the resume spread at random, not all at 0.1 s (the same
    100 ms at the other members)."""
    for _ in range(300):  # each a host whose stream held, then was lost
        failures = WatchFailures("127.0.0.1:2379", spread, logging.getLogger("t"))
        assert asyncio.run(failures.lost(RegistryUnavailable("gone"), 7))
    assert len(waits) == 300 and all(0.1 <= w <= most for w in waits), (min(waits), max(waits))
    if not spread:
        assert set(waits) == {0.1}
        return
    assert max(waits) - min(waits) > (most - 0.1) * 0.9, (min(waits), max(waits))
    if spread == 3.0:  # the default: ~10 % a 100 ms (all of them before)
        busiest = max(sum(t <= w < t + 0.1 for w in waits)
                      for t in (0.1 + i * 0.01 for i in range(100)))
        assert busiest < 60, busiest


@pytest.mark.parametrize(("code", "details", "over"), [
    (grpc.StatusCode.RESOURCE_EXHAUSTED,
     "Received message larger than max (83886080 vs. 67108864)", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", False),
    (grpc.StatusCode.UNAVAILABLE, "Received message larger than max (1 vs. 0)", False),
])
def test_only_an_answer_over_the_receive_limit_is_read_again_instead(
        code: grpc.StatusCode, details: str, over: bool) -> None:
    """gRPC's own limit, not etcd throttling (RESOURCE_EXHAUSTED too): a lost link, resumed."""
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    assert over_limit(exc) is over
    assert not over_limit(RegistryUnavailable(details))
