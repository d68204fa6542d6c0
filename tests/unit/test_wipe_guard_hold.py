"""How long the wipe guard waits (watcher/guard.py): ``hold`` against a write-back slower than
it (rule 3), and a service's last instance while removals keep coming.

A fleet's registry busy writing a wipe back (every host reading every node of it: ZooKeeper
with every host following the whole catalog took up to 57 s, ``bench/written_back.py --follow
all``) must not see the services that wait last emptied at ``hold`` (45 s) while their hosts
are still putting them back: ``hold`` counts from the last held instance back, twice ``hold``
at most; with none coming back they go at ``hold`` as before
(``test_wipe_guard_weights.py``, ``test_wipe_guard_drains.py``).
"""

from __future__ import annotations

import pytest

from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard import GuardSettings, WipeGuard
from tests.unit.test_wipe_guard import HOLD, Clock, delete, feed, ids, inst, put, setup, tick


def wiped(n: int) -> tuple[list[Instance], Catalog, WipeGuard, Clock]:
    """``n`` services of one instance each (each on its own node), all deleted at once and
    held from 0.25 s on."""
    fleet = [inst(f"s{k}", k) for k in range(n)]
    catalog, guard, clock = setup(fleet)
    for i in fleet:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1 and guard.status.holding == n
    return fleet, catalog, guard, clock


def at(clock: Clock, start: float, catalog: Catalog, guard: WipeGuard, t: float) -> None:
    """Tick to ``t`` seconds after the wipe's start."""
    tick(catalog, guard, clock, start + t - clock.now)


def test_held_instances_wait_past_hold_while_others_still_come_back() -> None:
    fleet, catalog, guard, clock = wiped(12)
    start = clock.now - 0.25
    for k, t in enumerate((8, 16, 24, 32, 40, 42)):  # one host a while writes its own back
        at(clock, start, catalog, guard, t)
        feed(catalog, guard, put(fleet[k]))
    at(clock, start, catalog, guard, 0.25 + HOLD + 1)  # past hold: the last came back 4 s ago
    assert guard.status.holding == 6
    assert ids(catalog) == {i.id for i in fleet}
    at(clock, start, catalog, guard, 42 + HOLD - 0.1)
    assert guard.status.holding == 6
    at(clock, start, catalog, guard, 42 + HOLD + 0.1)  # none back for hold
    assert guard.status.holding == 0
    assert ids(catalog) == {i.id for i in fleet[:6]}


def test_held_instances_wait_at_most_twice_hold() -> None:
    fleet, catalog, guard, clock = wiped(30)
    start = clock.now - 0.25
    backs = 0
    for k, t in enumerate(range(5, 2 * int(HOLD) + 1, 5)):  # one back every 5 s throughout
        at(clock, start, catalog, guard, t)
        feed(catalog, guard, put(fleet[k]))
        backs += 1
    assert backs == 2 * int(HOLD) // 5 and backs < len(fleet)
    assert guard.status.holding == len(fleet) - backs
    at(clock, start, catalog, guard, 0.25 + 2 * HOLD + 0.1)
    assert guard.status.holding == 0
    assert ids(catalog) == {i.id for i in fleet[:backs]}


def test_held_instances_a_reset_reads_back_count_as_coming_back() -> None:
    fleet, catalog, guard, clock = wiped(12)
    start = clock.now - 0.25
    at(clock, start, catalog, guard, 40)  # a reconnect's read finds half of them back
    back = {i.key: i for i in fleet[:6]}
    feed(catalog, guard, Change("reset", snapshot=Snapshot(back, revision=20)))
    assert guard.status.holding == 6
    at(clock, start, catalog, guard, 0.25 + HOLD + 1)
    assert guard.status.holding == 6
    at(clock, start, catalog, guard, 40 + HOLD + 0.1)
    assert guard.status.holding == 0
    assert ids(catalog) == {i.id for i in fleet[:6]}


@pytest.mark.parametrize(("every", "batch", "seconds", "gone_at"), [
    (0.1, 1, 3.0, 3.0 + 2.0),
    (0.5, 5, 10.0, 10.0 + 2.0),  # etcd's lessor: a tick's revokes, 0.5 s apart
    (0.1, 1, GuardSettings().horizon + 5, GuardSettings().horizon)])
def test_a_last_instance_waits_while_removals_keep_coming_horizon_at_most(
        every: float, batch: int, seconds: float, gone_at: float) -> None:
    """Hosts dying one after another (not a wipe: a small share of a big catalog): a
    service's last instance is removed once removals of more than one node pause for
    ``window``, or ``horizon`` after it at the latest. It was once they paused for ``settle``,
    ``window`` after it at the latest: a wipe that reached a loaded watcher slower than that,
    or with pauses, emptied services (``test_a_prefix_deleted_at_once_empties_no_service``;
    the lease wave over 10,000 hosts of ``bench/wipe_guard.py``: 3 of 10,000)."""
    others = [inst("big", n) for n in range(100, 1100)]  # each on its own node
    lone = inst("lone", 1)
    catalog, guard, clock = setup([lone, *others])
    rounds, rest = round(seconds / every), iter(others)
    for n in range(rounds + 1):  # the first (at 0 s) with the lone one
        for i in [lone, *(next(rest) for _ in range(batch - 1))] if n == 0 else \
                [next(rest) for _ in range(batch)]:
            feed(catalog, guard, delete(i))
        t = clock.now - 100.0
        if abs(t - gone_at) > 0.05:
            assert bool(ids(catalog, "lone")) == (t < gone_at), t
        if n < rounds:
            tick(catalog, guard, clock, every)
    if gone_at > seconds:  # the removals stopped: it goes ``window`` after them
        tick(catalog, guard, clock, gone_at - (clock.now - 100.0) - 0.1)
        assert ids(catalog, "lone")
    tick(catalog, guard, clock, 0.2)
    assert not ids(catalog, "lone") and guard.status.engaged == 0


def test_two_removals_of_two_nodes_still_settle() -> None:
    """Fewer than ``min_removed`` removals make no wipe: two services' last instances, of two
    nodes, deleted at once still go after ``settle`` (``window`` is waited only once the
    burst took ``min_removed`` of more than one node)."""
    a, b = inst("a", 1), inst("b", 2)
    catalog, guard, clock = setup([a, b, *(inst("big", n) for n in range(100, 110))])
    feed(catalog, guard, delete(a))
    feed(catalog, guard, delete(b))
    tick(catalog, guard, clock, 0.1)
    assert ids(catalog, "a") and ids(catalog, "b")
    tick(catalog, guard, clock, 0.15)
    assert not ids(catalog, "a") and not ids(catalog, "b") and guard.status.engaged == 0


def late_loop(catalog: Catalog, guard: WipeGuard, clock: Clock,
              deletes: list[tuple[float, Instance]], late: float, first: float = 0.0) -> int:
    """A watcher's main loop ``late`` s behind each deadline (``first``: not before then), the
    ``deletes`` (s from now) coming as they come, for 5 s; how many times it looked."""
    start, looked = clock.now, 0
    while True:  # the first 5 s (the hold, 45 s, is not what this is about)
        due = guard.next_due()
        loop_at = max(due + late, start + first) if due is not None else float("inf")
        if deletes and start + deletes[0][0] <= loop_at:
            clock.now = start + deletes[0][0]
            feed(catalog, guard, delete(deletes.pop(0)[1]))
        elif loop_at <= start + 5.0:
            tick(catalog, guard, clock, loop_at - clock.now)
            looked += 1
        else:
            break
    assert not deletes and looked >= 1
    return looked


@pytest.mark.parametrize("after", [False, True])
def test_a_wipe_a_late_main_loop_looks_at_after_it_ended_is_still_held(after: bool) -> None:
    """A watcher's loop calls ``due()`` late when its CPU is taken (between coalescing and
    its sync: ``wait_max``, a reload's interval). The last instances of a burst that made a
    wipe wait ``window`` after the last removal, the moment the wipe is over: one looked at
    after it must be held as the wipe's, not applied as a settled removal (40 services of one
    instance, one delete every 0.1 s, the 21st is half the catalog and the last; ``after``:
    an unrelated removal once it is over, a new burst, changes nothing)."""
    fleet = [inst(f"s{k:02d}", k) for k in range(40)]
    x = [inst("x", 50), inst("x", 51)]
    catalog, guard, clock = setup([*fleet, *x])
    deletes = [(0.1 * k, i) for k, i in enumerate(fleet[:21])] + ([(4.02, x[0])] if after else [])
    late_loop(catalog, guard, clock, deletes, 0.35)
    assert guard.status.engaged == 1
    assert all(ids(catalog, i.service) for i in fleet), "a service emptied"
    assert guard.status.holding == 21
    assert ids(catalog, "x") == ({x[1].id} if after else {i.id for i in x})


def test_a_late_main_loop_releases_a_wipes_removal_whose_service_has_another() -> None:
    """Looked at only after the wipe ended, a removal of the wipe whose service has another
    instance serving goes then (as it would have when the wipe ended), the others are held."""
    a1, a2, b3, c4 = inst("a", 1), inst("a", 2), inst("b", 3), inst("c", 4)
    catalog, guard, clock = setup([a1, a2, b3, c4])
    late_loop(catalog, guard, clock, [(0.0, b3), (0.05, c4), (0.1, a1)], 0.0, first=2.2)
    assert guard.status.engaged == 1 and guard.held() == [b3.key, c4.key]
    assert ids(catalog, "a") == {a2.id} and ids(catalog, "b") and ids(catalog, "c")


def test_a_late_look_at_a_wipes_removal_waits_for_no_burst_after_it() -> None:
    """A removal of the wipe whose service has another instance serving goes at the late
    look, not when a new burst after the wipe (removals of other nodes, no wipe) pauses: it
    stayed up to ``horizon`` beside its serving sibling."""
    a1, a2 = inst("a", 1), inst("a", 2)
    singles = [inst(f"s{k:02d}", 10 + k) for k in range(20)]
    big = [inst("big", n) for n in range(100, 200)]
    catalog, guard, clock = setup([a1, a2, *singles, *big])
    deletes = [(0.05 * k, i) for k, i in enumerate([*singles, a1])]  # a wipe, a1 last: 1.0 s
    deletes += [(at, i) for at, i in zip((3.05, 3.1, 3.15, 3.65, 4.15, 4.65), big[:6], strict=True)]
    # and a new burst after it (3 nodes before the late look: it waits for them to pause 2 s)
    late_loop(catalog, guard, clock, deletes, 0.0, first=3.3)
    assert guard.status.engaged == 1 and a1.key not in guard.held()
    assert ids(catalog, "a") == {a2.id} and all(ids(catalog, i.service) for i in singles)

