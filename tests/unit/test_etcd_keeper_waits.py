"""When the etcd lease's keeper tries again after a failed round (etcd_keepalive.KeeperWaits):
link down, soon (retry_wait, as before); refused by etcd (a new lease or the rewrite of the
instances: out of space, no write permission), 0.8 s later, the wait doubling (±25 %) to
30 s, while a lease held is renewed every renewal interval. Before, every refusal was tried
again every 0.8 s (±50 %), forever. The rounds here run on a registry that talks to no etcd
(its calls replaced)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from discovery.errors import RegistryDenied, RegistryError, RegistryUnavailable
from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.etcd_keepalive import GONE_RETRY, REFUSED_MAX, KeeperWaits

NOSPACE = RegistryError("etcd at x: grant lease failed: etcdserver: mvcc: database space exceeded")
DENIED = RegistryError("etcd at x: put /y failed: PERMISSION_DENIED: etcdserver: permission denied")
DOWN = RegistryUnavailable("etcd at x: grant lease failed, no member answered within 5s")
INTERVAL = 3.0  # the keeper's renewal interval (TTL 9 s)
WEB = Instance(service="web", id="node-1:000000000001:80", node="node-1", address="127.0.0.1",
               port=8001, registered_at=1.0)


def test_refusals_wait_longer_and_longer_up_to_30_s() -> None:
    for _ in range(50):
        waits = KeeperWaits(9.0, INTERVAL)
        got = [waits.failed(NOSPACE, 0.0, leased=False) for _ in range(10)]
        nominal = [min(GONE_RETRY * 2**n, REFUSED_MAX) for n in range(10)]
        for wait, nom in zip(got, nominal, strict=True):
            assert 0.75 * nom <= wait <= min(1.25 * nom, REFUSED_MAX), (got, nominal)
        growing = got[:6]  # below the cap: each wait longer than the last, jitter or not
        assert growing == sorted(growing) and len(set(growing)) == 6, got
        assert not waits.due()
        waits.succeeded()  # a round that did all it had to: from 0.8 s again
        assert waits.due() and waits.failed(NOSPACE, 0.0, leased=False) <= 1.25 * GONE_RETRY


def test_a_link_down_keeps_the_short_wait_and_does_not_count_as_a_refusal() -> None:
    waits = KeeperWaits(9.0, INTERVAL)
    gone = time.monotonic() - 60  # the lease ran out long ago: 0.8 s ±50 %, as before
    assert all(0.4 <= waits.failed(DOWN, gone, leased=False) <= 1.2 for _ in range(100))
    assert waits.due() and waits.refused.wait == 0
    for _ in range(4):
        waits.failed(NOSPACE, gone, leased=False)
    assert waits.failed(DOWN, gone, leased=False) <= 1.2  # down: short, whatever was refused
    assert waits.due()  # the registry's return: what was refused is tried at once...
    assert waits.failed(NOSPACE, gone, leased=False) >= 0.75 * 16 * GONE_RETRY  # ...wait kept


def test_a_lease_held_is_renewed_while_a_refused_rewrite_waits() -> None:
    waits = KeeperWaits(9.0, INTERVAL)
    for _ in range(6):
        wait = waits.failed(DENIED, time.monotonic(), leased=True)
        assert wait <= 1.1 * INTERVAL  # the next renewal, at the latest
    assert waits.refused.due - time.monotonic() > 10  # the rewrite: much later
    assert waits.pending(leased=True) <= 1.1 * INTERVAL
    assert waits.pending(leased=False) > 10  # no lease to renew: wait for the turn


@pytest.fixture
def registry() -> Iterator[Any]:
    """An etcd registry that talks to nothing, holding WEB (its lease and calls: the test's)."""
    reg: Any = open_registry("etcd://127.0.0.1:1/x", ttl=3 * INTERVAL, timeout=0.5)
    reg._owned = {WEB.key: WEB}
    try:
        yield reg
    finally:
        reg.close(revoke=False)


def test_a_refused_new_lease_is_asked_for_again_only_when_due(
        registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The lease revoked, etcd out of space: a round asks for a lease, is refused, and the
    rounds before the wait is over ask nothing (before: every round, every 0.8 s)."""
    asked: list[str] = []

    def refuse(what: str, *args: Any, **kw: Any) -> Any:
        asked.append(what)
        raise NOSPACE

    registry._call = refuse
    registry._lease, registry._need_reput = None, True
    gone = time.monotonic() - 60
    with caplog.at_level(logging.WARNING, logger="discovery.registry"):
        wait, _ = registry._keep_round(INTERVAL, 1.0, gone, (None, None))
    assert asked == ["grant lease"] and 0.6 <= wait <= 1.0, (asked, wait)
    assert "database space exceeded" in caplog.text and "tries again in" in caplog.text
    again, _ = registry._keep_round(INTERVAL, wait, gone, (None, None))  # woken early
    assert asked == ["grant lease"] and 0 < again <= wait, (asked, again)
    registry._waits.refused.due = time.monotonic()  # its turn
    wait, _ = registry._keep_round(INTERVAL, again, gone, (None, None))
    assert asked == ["grant lease"] * 2 and 1.2 <= wait <= 2.0, (asked, wait)


def test_a_refused_rewrite_is_tried_when_due_and_the_lease_renewed_every_round(
        registry: Any) -> None:
    """A new lease granted, the rewrite refused (no write permission): every round renews,
    only the rounds at the rewrite's turn write (before: both, every 0.8 s)."""
    renewals, writes = [], []
    registry._renewals = SimpleNamespace(  # the keepalive stream's renewal, answered
        renew=lambda lease: renewals.append(lease) or [SimpleNamespace(TTL=9)],
        close=lambda: None, endpoint=None)

    def put(inst: Instance, lease: int) -> None:
        writes.append(lease)
        raise DENIED

    registry._put = put
    registry._lease, registry._need_reput = 7, True
    renewed = time.monotonic() - 60
    waits = []
    for turn in range(4):
        if turn == 3:
            registry._waits.refused.due = time.monotonic()  # the rewrite's turn
        wait, renewed = registry._keep_round(INTERVAL, 1.0, renewed, (None, None))
        waits.append(wait)
    assert renewals == [7] * 4, renewals
    assert writes == [7, 7], writes  # the first round and the one at its turn
    assert waits[0] <= 1.0 and waits[3] <= 1.1 * INTERVAL, waits
    assert time.monotonic() - renewed < 1  # renewed: a link down now would wait ~INTERVAL
    registry._put = lambda inst, lease: writes.append(lease)  # writable again
    registry._waits.refused.due = time.monotonic()
    wait, _ = registry._keep_round(INTERVAL, 1.0, renewed, (None, None))
    assert not registry._need_reput and 0.9 * INTERVAL <= wait <= 1.1 * INTERVAL
    assert registry._waits.refused.wait == 0  # a next refusal: 0.8 s again


def test_one_refused_instance_does_not_hold_back_the_others_rewrite(registry: Any) -> None:
    """A new lease, and the role may no longer write one service: the rewrite writes every
    other instance in that round (it stopped at the refused one, the ones after it missing
    from every catalog until the agent's next reconcile), then says it was refused."""
    api = Instance(service="api", id="node-1:000000000002:80", node="node-1",
                   address="127.0.0.1", port=8002, registered_at=1.0)
    registry._owned = {WEB.key: WEB, api.key: api}
    written: list[str] = []

    def put(inst: Instance, lease: int) -> None:
        if inst.service == "web":
            raise RegistryDenied("etcd at x: put web: PERMISSION_DENIED")
        written.append(inst.service)

    registry._put = put
    registry._lease, registry._need_reput = 7, True  # (a rewrite is due: a new lease)
    with pytest.raises(RegistryDenied):
        registry._reput_all()
    assert written == ["api"] and registry._need_reput  # tried again at the keeper's turn
    with pytest.raises(RegistryDenied):  # the keeper's next turns write the refused one
        registry._reput_all()  # alone: each write reaches every host (api was written
    assert written == ["api"] and registry._need_reput  # again at each turn)
    registry._put = lambda inst, lease: written.append(inst.service)  # granted again
    registry._reput_all()
    assert written == ["api", "web"] and not registry._need_reput


def _sleep_in_a_loop(waits: KeeperWaits, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=asyncio.run, args=(waits.sleep(seconds),))
    thread.start()
    deadline = time.monotonic() + 2
    while waits._wake is None and time.monotonic() < deadline:  # asleep
        time.sleep(0.01)
    return thread


def test_the_registrys_return_wakes_a_keeper_waiting_after_a_refusal() -> None:
    waits = KeeperWaits(9.0, INTERVAL)
    waits.failed(NOSPACE, 0.0, leased=False)
    sleeping = _sleep_in_a_loop(waits, 30.0)
    started = time.monotonic()
    waits.back()
    sleeping.join(5)
    assert not sleeping.is_alive() and time.monotonic() - started <= 1.5 * GONE_RETRY + 0.3
    assert waits.due() and waits.refused.wait == GONE_RETRY  # at once; the wait kept


def test_a_return_with_nothing_refused_leaves_the_keepers_wait_alone() -> None:
    """After a plain outage the keeper's waits are retry_wait's, spread over the fleet: the
    registry's return must not bring every keeper back in its first second."""
    waits = KeeperWaits(9.0, INTERVAL)
    sleeping = _sleep_in_a_loop(waits, 1.0)
    started = time.monotonic()
    waits.back()
    sleeping.join(5)
    assert time.monotonic() - started >= 0.8


def test_the_registrys_state_going_up_again_is_the_return(registry: Any) -> None:
    told: list[bool] = []
    registry._waits.back = lambda: told.append(True)
    registry.set_state(True)  # the first call that worked: not a return
    assert told == []
    registry.set_state(False)
    registry.set_state(True)
    assert told == [True]


def test_a_rewrite_done_meanwhile_is_not_done_again(registry: Any) -> None:
    """A keeper round that saw a rewrite due before another thread did it (a write-back's or
    a register's new lease) writes nothing again: each write reaches every host."""
    registry._owned = {WEB.key: WEB}
    written: list[str] = []
    registry._put = lambda inst, lease: written.append(inst.service)
    registry._lease, registry._need_reput = 7, False
    registry._reput_all()
    assert written == []
    registry._need_reput = True
    registry._reput_all()
    assert written == ["web"] and not registry._need_reput
