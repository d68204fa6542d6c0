"""The wipe guard and weight 0: an up instance of weight 0 takes no new traffic from HAProxy
but is answered by DNS, the HTTP API and clients. Its removal counts and is held as any up
instance's; a service is *emptied* (HAProxy answers 503) once none of it serves (up and of
weight above 0), and a removal that would leave it so settles first."""

from __future__ import annotations

from dataclasses import replace

from discovery.model import Instance, State
from tests.unit.test_wipe_guard import HOLD, delete, feed, ids, put, setup, tick
from tests.unit.test_wipe_guard import inst as bare
from tests.unit.test_wipe_guard_drains import STAMP, inst


def weight_0(i: Instance) -> Instance:
    return replace(i, weight=0)


def test_a_wipe_counts_and_holds_up_instances_of_weight_0() -> None:
    """Two services of two serving instances and a pool of six at weight 0 (10 in the
    catalog): a wipe of everything, the pool's deletes last. Counted by serving instances
    alone, the wipe would have been 4 of 10 and every service's last would have gone."""
    served = [bare(s, n) for n, s in enumerate("aabb", start=1)]
    pool = [weight_0(bare("pool", n)) for n in range(5, 11)]
    catalog, guard, clock = setup(served + pool)
    for i in served + pool:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1
    assert ids(catalog, "pool") == {i.id for i in pool}  # DNS goes on answering them
    assert ids(catalog, "a") and ids(catalog, "b")
    assert catalog.serving_count("a") and catalog.serving_count("b")


def test_the_last_up_instance_of_weight_0_settles_and_one_beside_another_up_goes() -> None:
    a1, a2, b1 = weight_0(bare("a", 1)), weight_0(bare("a", 2)), bare("b", 3)
    catalog, guard, clock = setup([a1, a2, b1])
    feed(catalog, guard, delete(a1))  # a keeps an up instance (DNS): at once
    assert ids(catalog, "a") == {a2.id} and guard.status.settling == 0
    feed(catalog, guard, delete(a2))  # a's last up instance: settles
    assert ids(catalog, "a") == {a2.id} and guard.status.settling == 1
    tick(catalog, guard, clock, 0.25)
    assert ids(catalog, "a") == set() and guard.status.engaged == 0


def test_a_removal_leaving_only_instances_of_weight_0_settles() -> None:
    """Its service then serves nothing through HAProxy (503): its last serving instance."""
    a1, a2, b1 = bare("a", 1), weight_0(bare("a", 2)), bare("b", 3)
    catalog, guard, clock = setup([a1, a2, b1])
    feed(catalog, guard, delete(a1))
    assert catalog.serving_count("a") == 1 and guard.status.settling == 1
    tick(catalog, guard, clock, 0.25)
    assert ids(catalog, "a") == {a2.id} and catalog.serving_count("a") == 0


def test_an_agents_own_weight_0_is_applied_at_once() -> None:
    """Stamped by its agent (a label changed, a redeploy): never held, even for a service's
    last serving instance; another writer's, with the stamp it read, settles."""
    a1, b1 = inst("a", 1), inst("b", 2)
    catalog, guard, clock = setup([a1, b1])
    feed(catalog, guard, put(replace(a1, weight=0, written_at=STAMP + 1)))
    assert catalog.serving_count("a") == 0 and guard.status.settling == 0
    feed(catalog, guard, put(weight_0(b1)))
    assert catalog.get(b1.key) == b1 and guard.status.settling == 1
    tick(catalog, guard, clock, 0.25)
    assert catalog.get(b1.key) == weight_0(b1) and catalog.up_count("b") == 1


def test_a_drain_of_an_up_instance_of_weight_0_by_another_writer_counts() -> None:
    """``draining`` takes it out of DNS and HTTP: a drain, though it served no HAProxy."""
    fleet = [weight_0(inst(s, n)) for n, s in enumerate("abcd", start=1)]
    catalog, guard, clock = setup(fleet)
    for i in fleet:
        feed(catalog, guard, put(replace(i, state=State.DRAINING)))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1 and guard.status.holding == 4
    assert all(catalog.get(i.key) == i for i in fleet)


def test_a_deferred_drain_to_weight_0_still_counts_as_up_for_its_service() -> None:
    """``a1``'s weight set to 0 by another writer settles (its service's last serving); it
    stays up either way, so a delete of ``a2`` (weight 0) beside it is no last up: at once."""
    a1, a2, b1 = inst("s", 1), weight_0(inst("s", 2)), inst("b", 3)
    catalog, guard, _ = setup([a1, a2, b1])
    feed(catalog, guard, put(weight_0(a1)))
    assert guard.status.settling == 1
    feed(catalog, guard, delete(a2))
    assert catalog.get(a2.key) is None and guard.status.settling == 1


def test_a_hold_running_out_does_not_release_another_of_its_service() -> None:
    """Held: ``a1`` (serving), then ``a2`` (weight 0) a second later, nothing else of their
    service. ``a1``'s hold runs out in the same pass that looks at ``a2`` again (a put to
    the service): ``a1`` goes, and ``a2``, whose hold has not run out, must stay (released
    one after the other, ``a1`` no longer counted as held yet still in the catalog, it went
    too)."""
    a1, a2 = bare("s", 1), weight_0(bare("s", 2))
    others = [bare(x, n) for n, x in enumerate("xxyy", start=3)]
    catalog, guard, clock = setup([a1, a2, *others])
    for i in [a1, *others]:  # 5 of 8: a wipe (seen at the fourth; x's first, gone at once,
        feed(catalog, guard, delete(i))  # put back then)
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1 and guard.status.holding == 5
    tick(catalog, guard, clock, 0.75)
    feed(catalog, guard, delete(a2))  # within the window: held too, a second after a1
    tick(catalog, guard, clock, 0.25)
    assert guard.status.holding == 6
    tick(catalog, guard, clock, 5.0)  # the wipe over; s has nothing else: both kept
    assert ids(catalog, "s") == {a1.id, a2.id}
    tick(catalog, guard, clock, HOLD - 10.0)
    feed(catalog, guard, put(replace(bare("s", 9), state=State.DRAINING)))  # s looked at
    tick(catalog, guard, clock, 4.0)  # a1's hold ran out, a2's not
    assert ids(catalog, "s") == {a2.id, bare("s", 9).id}
    tick(catalog, guard, clock, 1.5)
    assert ids(catalog, "s") == {bare("s", 9).id}
