"""A write stamp (``written_at``) far ahead of the clocks: a record written by a host whose clock
was far ahead, or by hand. Before, it passed as any stamp: the instance's agent did not know of
it until its next reconcile, so its drain (stamped now, behind it) was taken by every watcher's
wipe guard for another writer's (counted toward a wipe; the service's last instance kept in
rotation while it settled); after that reconcile the agent stamped every write of the key after
it, a year ahead, for as long as the key lived (through restarts), and every watcher counted
each such write's ``write_to_received`` as 0 s. Now such a stamp orders nothing: the agent's
next write is stamped now (logged, naming the key), the guard takes it for no stamp, and
propagation counts no duration through it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from discovery.agent.registrations import Registrations
from discovery.metrics import Metrics
from discovery.model import Instance, State
from discovery.model.instance import stamp_after
from discovery.registry.base import Snapshot
from discovery.watcher.guard_burst import foreign_drain
from tests.unit.test_agent_departure import Recorder, inst, registrations
from tests.unit.test_wipe_guard import feed, put, setup

YEAR = 365 * 86400.0


def test_a_stamp_far_ahead_orders_no_write() -> None:
    now = time.time()
    assert stamp_after(now + YEAR, now) == now  # not trusted: stamped now
    assert stamp_after(now + 100.0, now) == pytest.approx(now + 100.001)  # a clock's skew
    assert stamp_after(now - 5.0, now) == now


def test_the_guard_takes_a_stamp_far_ahead_for_none() -> None:
    """A drain of a record stamped a year ahead is never taken for another writer's: the
    instance's agent stamps its next write now. A stamp a little ahead (clocks differ) still
    tells a script's drain, which keeps the stamp it read."""
    a = replace(inst("a", 1), written_at=time.time() + YEAR)
    assert not foreign_drain(a, replace(a, state=State.DRAINING, written_at=time.time()))
    assert not foreign_drain(a, a.with_state(State.DRAINING))  # as a record with no stamp
    skewed = replace(a, written_at=time.time() + 60.0)
    assert foreign_drain(skewed, skewed.with_state(State.DRAINING))


def written(a: Instance) -> tuple[Registrations, Recorder, Instance]:
    """``a`` registered by its agent, then its record rewritten by hand a year ahead."""
    regs, reg = registrations()
    regs.write(a.key, a)
    return regs, reg, replace(reg.writes[-1][1], written_at=time.time() + YEAR)


def test_an_agents_drain_after_a_stamp_far_ahead_is_its_own_at_once() -> None:
    """Before the agent's reconcile reads the hand-written value: its drain, stamped now, is
    behind that stamp. Every watcher took it for another writer's; the service's last
    instance stayed in rotation."""
    a = inst("a", 1)
    regs, reg, there = written(a)
    regs.write(a.key, None)  # the container stopped: drained, then deleted
    drain = reg.writes[1][1]
    assert drain.state is State.DRAINING and not foreign_drain(there, drain)
    catalog, guard, _ = setup([there, inst("b", 2), inst("c", 3)])
    feed(catalog, guard, put(drain))
    now = catalog.get(a.key)
    assert now is not None and now.state is State.DRAINING  # out of rotation at once
    assert guard.next_due() is None  # not settling: applied


def test_a_reconcile_does_not_carry_a_stamp_far_ahead(caplog: pytest.LogCaptureFixture) -> None:
    """After the reconcile read it: the agent's next write is stamped now, not after it (a
    year ahead, and every write of the key after it), logged once naming the key."""
    a = inst("a", 1)
    regs, reg, there = written(a)
    with regs.turn():
        regs.reconcile(Snapshot({a.key: there}, 1), {a.key: a})
    assert regs.flush(5) and len(reg.writes) == 1  # the same value: not written again
    caplog.set_level(logging.WARNING, "discovery.agent.registrations")
    regs.write(a.key, replace(a, weight=0))
    regs.write(a.key, None)
    put_, drain = reg.writes[1][1], reg.writes[2][1]
    assert put_.written_at <= time.time()  # stamped now
    assert drain.written_at > put_.written_at and not foreign_drain(put_, drain)
    assert not foreign_drain(there, put_)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and a.id in warned[0] and "ahead" in warned[0]


def test_propagation_counts_no_duration_through_a_stamp_far_ahead() -> None:
    stages = Metrics().stages
    record = replace(inst("a", 1), seen_at=999.0, written_at=1000.0 + YEAR)
    assert stages.observe(record, received=1000.0, applied=1000.25) == {
        "received_to_applied": 0.25, "event_to_applied": 1.25}
    # a clock a little behind the writer's still counts 0, not negative
    record = replace(record, written_at=1001.0)
    assert stages.observe(record, received=1000.0, applied=1000.25)["write_to_received"] == 0.0
