"""The wipe guard and weight 0: an up instance of weight 0 takes no new traffic from HAProxy
but is answered by DNS, the HTTP API and clients. Its removal counts and is held as any up
instance's; a service is *emptied* (HAProxy answers 503) once none of it serves (up and of
weight above 0), and a removal that would leave it so settles first."""

from __future__ import annotations

from dataclasses import replace

from discovery.model import Instance, State
from tests.unit.test_wipe_guard import delete, feed, ids, put, setup, tick
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
