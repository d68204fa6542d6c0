"""The wipe guard and drains by another writer: a script that rewrites every value as
``draining`` or as weight 0, or an old backup restored, takes every instance out of rotation on
every host at once, as a delete of the prefix would. Such a drain, not stamped by the
instance's agent, counts, settles and is held as a removal; an agent's own drain never is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard import WipeGuard
from discovery.watcher.guard_burst import foreign_drain
from tests.unit.test_wipe_guard import HOLD, Clock, delete, feed, put, setup, tick
from tests.unit.test_wipe_guard import inst as bare

STAMP = 1000.0  # when each agent wrote its instance (written_at)


def inst(service: str, n: int) -> Instance:
    return replace(bare(service, n), written_at=STAMP)


def drained(i: Instance, by_agent: bool = False) -> Instance:
    """``i`` drained: by a script (its stamp kept), or by its agent (stamped anew)."""
    return replace(i, state=State.DRAINING, written_at=STAMP + 1 if by_agent else i.written_at)


def weighed_0(i: Instance) -> Instance:
    """``i`` at weight 0 by a script (its stamp kept): up, but serving nothing."""
    return replace(i, weight=0)


def up(catalog: Catalog, service: str | None = None) -> set[str]:
    return {i.id for i in catalog.instances(service) if i.serving}


def fleet_of(services: str) -> tuple[list[Instance], Catalog, WipeGuard, Clock]:
    fleet = [inst(s, n) for n, s in enumerate(services, start=1)]
    return (fleet, *setup(fleet))


def test_what_tells_a_foreign_drain() -> None:
    a = inst("a", 1)
    assert foreign_drain(a, drained(a))  # a script: the stamp it read
    assert foreign_drain(a, weighed_0(a))  # up, but serving nothing
    assert not foreign_drain(a, replace(weighed_0(a), written_at=STAMP + 1))  # its agent's
    assert foreign_drain(weighed_0(a), drained(weighed_0(a)))  # up (DNS answers it): out
    assert not foreign_drain(weighed_0(a), replace(weighed_0(a), port=1))  # still up
    assert foreign_drain(a, replace(drained(a), written_at=0.0))  # hand-written, no stamp
    assert not foreign_drain(a, drained(a, by_agent=True))  # its agent stamps its writes
    assert not foreign_drain(a, replace(a, port=1))  # not taken out of rotation
    assert not foreign_drain(drained(a), drained(a))  # draining already
    assert not foreign_drain(bare("a", 1), replace(bare("a", 1), state=State.DRAINING))
    # (no stamp at all, Nerve's layout: never taken for one)


@pytest.mark.parametrize("rewritten", [drained, weighed_0], ids=["draining", "weight-0"])
def test_a_script_draining_every_instance_is_held_until_written_back(
        rewritten: Callable[[Instance], Instance]) -> None:
    fleet, catalog, guard, clock = fleet_of("aabbcc")
    for i in fleet:  # every value rewritten, back to back
        feed(catalog, guard, put(rewritten(i)))
    # the first went before the wipe was seen (it left its service an instance up), and
    # was put back when it was: a held drain, as the rest
    assert up(catalog) == {i.id for i in fleet}
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1 and guard.status.holding == 6
    assert up(catalog, "b") and up(catalog, "c")  # no service out of rotation
    for i in fleet[:4]:  # their hosts write their values back (the stamps they had)
        feed(catalog, guard, put(i))
    assert up(catalog, "a") == {fleet[0].id, fleet[1].id} and guard.status.holding == 2
    tick(catalog, guard, clock, 1.0)  # the wipe over; c has nothing else up: kept
    assert up(catalog, "c") == {fleet[4].id, fleet[5].id}
    tick(catalog, guard, clock, HOLD)  # c's host never wrote back: the drain applied
    assert up(catalog, "c") == set() and guard.status.holding == 0
    assert catalog.instances("c") == [rewritten(fleet[4]), rewritten(fleet[5])]


def test_agents_draining_their_own_are_never_held() -> None:
    """A fleet's agents draining their instances (a deploy, maintenance): stamped, applied at
    once, and their deletes that follow are departures."""
    fleet, catalog, guard, _ = fleet_of("aabbcc")
    for i in fleet:
        feed(catalog, guard, put(drained(i, by_agent=True)))
    assert up(catalog) == set() and guard.status.engaged == 0
    for i in fleet:
        feed(catalog, guard, delete(i))
    assert catalog.instances() == [] and guard.status.engaged == 0


def test_a_foreign_drain_of_a_last_instance_settles_then_applies() -> None:
    fleet, catalog, guard, clock = fleet_of("ab")
    feed(catalog, guard, put(drained(fleet[0])))  # a's only instance
    assert catalog.get(fleet[0].key) == fleet[0] and guard.status.settling == 1
    tick(catalog, guard, clock, 0.25)
    assert catalog.get(fleet[0].key) == drained(fleet[0]) and guard.status.engaged == 0
    plain = bare("b", 2)  # records with no stamp at all (Nerve's layout): applied at once
    catalog, guard, clock = setup([plain])
    feed(catalog, guard, put(replace(plain, state=State.DRAINING)))
    assert up(catalog) == set() and guard.status.settling == 0


def test_a_delete_after_a_held_drain_is_a_removal() -> None:
    fleet, catalog, guard, clock = fleet_of("abcd")
    for i in fleet:
        feed(catalog, guard, put(drained(i)))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.holding == 4 and up(catalog) == {i.id for i in fleet}
    feed(catalog, guard, delete(fleet[0]))  # then deleted: still held, now as a removal
    assert up(catalog, "a") == {fleet[0].id}
    tick(catalog, guard, clock, HOLD + 1.0)
    assert catalog.get(fleet[0].key) is None  # gone, not left drained
    assert all(catalog.get(i.key) == drained(i) for i in fleet[1:])


@pytest.mark.parametrize("rewritten", [drained, weighed_0], ids=["draining", "weight-0"])
def test_a_reset_carrying_foreign_drains_keeps_them_up(
        rewritten: Callable[[Instance], Instance]) -> None:
    fleet, catalog, guard, clock = fleet_of("abcd")
    snap = Snapshot({i.key: rewritten(i) for i in fleet}, revision=9)
    feed(catalog, guard, Change("reset", snapshot=snap, revision=9))
    assert up(catalog) == {i.id for i in fleet} and guard.status.engaged == 1
    tick(catalog, guard, clock, 0.3)
    assert guard.status.holding == 4
    back = {**snap.instances, fleet[0].key: fleet[0], fleet[1].key: fleet[1]}
    feed(catalog, guard, Change("reset", snapshot=Snapshot(back, revision=10), revision=10))
    assert up(catalog) == {i.id for i in fleet} and guard.status.holding == 2
    tick(catalog, guard, clock, HOLD + 1.0)  # c's and d's never written back: drained
    assert up(catalog) == {fleet[0].id, fleet[1].id}
    assert catalog.get(fleet[3].key) == rewritten(fleet[3]) and guard.status.holding == 0


def test_a_held_drain_whose_instance_a_reset_lacks_is_removed_not_drained() -> None:
    """Held drains, then a re-read in which one instance is gone (its agent drained and
    deleted it meanwhile): at its release it goes; the catalog keeps no drained ghost."""
    fleet, catalog, guard, clock = fleet_of("abcd")
    for i in fleet:
        feed(catalog, guard, put(drained(i)))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.holding == 4
    rest = {i.key: drained(i) for i in fleet[1:]}
    feed(catalog, guard, Change("reset", snapshot=Snapshot(rest, revision=9), revision=9))
    assert up(catalog) == {i.id for i in fleet}  # still held, a's as a removal now
    tick(catalog, guard, clock, HOLD + 1.0)
    assert catalog.get(fleet[0].key) is None
    assert {i.key for i in catalog.instances()} == set(rest)
