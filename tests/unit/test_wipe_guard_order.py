"""The wipe guard and the order a wipe arrives in: ``etcdctl del --prefix`` reaches every
watcher as deletes in key order, service after service. Before the burst makes half the
catalog, each delete that leaves its service another instance is applied at once; the services
first in the order were left with one instance on every host until their agents wrote them
back. Once the burst is seen as a wipe, what it took before is put back and held as the rest."""

from __future__ import annotations

from dataclasses import replace

from discovery.model import Instance
from discovery.registry import Change
from discovery.registry.base import Snapshot
from tests.unit.test_wipe_guard import HOLD, delete, feed, ids, put, setup, tick
from tests.unit.test_wipe_guard import inst as bare

SERVICES = "abcde"


def fleet(per_service: int = 10) -> list[Instance]:
    """``per_service`` instances of each service, one a node (nodes shared by the services)."""
    return [replace(bare(s, n), id=f"h{n}:{s}:80", node=f"h{n}")
            for s in SERVICES for n in range(1, per_service + 1)]


def test_a_prefix_delete_in_key_order_leaves_every_service_whole() -> None:
    instances = fleet()
    catalog, guard, clock = setup(instances)
    for i in sorted(instances, key=lambda i: i.key):  # one DeleteRange: one response
        feed(catalog, guard, delete(i))
    assert guard.status.engaged == 1
    for s in SERVICES:  # a (the first in the order) was down to one instance
        assert len(ids(catalog, s)) == 10, s
    assert guard.status.holding + guard.status.settling == 50
    tick(catalog, guard, clock, 0.25)  # those settling are held too
    assert guard.status.holding == 50
    tick(catalog, guard, clock, 5.0)  # the wipe over, no agent back yet: all held
    assert catalog.size() == 50
    for i in instances[:10]:  # a's agents write theirs back: a's are no longer held
        feed(catalog, guard, put(i))
    assert guard.status.holding == 40
    tick(catalog, guard, clock, 2 * HOLD + 1.0)  # the others never came back: removed
    assert catalog.size() == 10 and guard.status.holding == 0


def test_what_was_written_again_is_not_put_back() -> None:
    instances = fleet()
    catalog, guard, _ = setup(instances)
    first, rest = instances[:3], sorted(instances[3:], key=lambda i: i.key)
    for i in first:
        feed(catalog, guard, delete(i))
    moved = replace(first[0], port=9999)  # its agent wrote it again, elsewhere
    feed(catalog, guard, put(moved))
    for i in rest:
        feed(catalog, guard, delete(i))
    assert guard.status.engaged == 1
    assert catalog.get(first[0].key) == moved  # not the old value put back over it
    assert catalog.get(first[1].key) == first[1] and catalog.get(first[2].key) == first[2]


def test_a_host_dying_is_not_a_wipe_and_nothing_is_put_back() -> None:
    instances = fleet()
    catalog, guard, clock = setup(instances)
    dead = [i for i in instances if i.node == "h3"]  # one of each service
    for i in dead:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 3.0)
    assert guard.status.engaged == 0 and catalog.size() == 45
    more = [i for i in instances if i.node == "h4"]  # a second host, after a pause
    for i in more:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 3.0)
    assert guard.status.engaged == 0 and catalog.size() == 40
    assert all(catalog.get(i.key) is None for i in dead + more)


def test_removals_before_a_resync_that_shows_the_wipe_are_put_back() -> None:
    """Some deletes arrive one by one (each leaves its service another instance: applied), then
    the watch is lost and the snapshot read again shows the rest gone."""
    instances = fleet()
    catalog, guard, clock = setup(instances)
    early = instances[:4]
    for i in early:
        feed(catalog, guard, delete(i))
    assert catalog.size() == 46 and guard.status.engaged == 0
    survivors = instances[40:]  # e's, and a's first written back meanwhile
    snapshot = Snapshot({i.key: i for i in [*survivors, early[0]]}, revision=5)
    feed(catalog, guard, Change("reset", snapshot=snapshot, revision=5))
    assert guard.status.engaged == 1
    assert catalog.size() == 50  # every removal kept, the early ones put back (held)
    tick(catalog, guard, clock, 0.25)
    assert guard.status.holding == 39  # (not early[0]: in the registry again)
