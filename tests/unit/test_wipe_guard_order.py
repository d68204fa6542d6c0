"""The wipe guard and the order a wipe arrives in: ``etcdctl del --prefix`` reaches every
watcher as deletes in key order, service after service. Before the burst makes half the
catalog, each delete that leaves its service another instance is applied at once; the services
first in the order were left with one instance on every host until their agents wrote them
back. Once the burst is seen as a wipe, what it took before is put back and held as the rest."""

from __future__ import annotations

from dataclasses import replace

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard import GuardSettings, WipeGuard
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


def test_what_its_agent_wrote_and_then_took_away_is_not_put_back() -> None:
    """Removed early in the burst; its agent writes it again, then departs (drains, deletes):
    the old value must not come back when the burst turns out a wipe."""
    instances = fleet()
    catalog, guard, clock = setup(instances)
    k = instances[0]
    feed(catalog, guard, delete(k))
    again = replace(k, port=9999, written_at=10.0)
    feed(catalog, guard, put(again))
    feed(catalog, guard, put(replace(again, state=State.DRAINING, written_at=11.0)))
    feed(catalog, guard, delete(again))  # its departure
    for i in sorted(instances[1:], key=lambda i: i.key):
        feed(catalog, guard, delete(i))
    assert guard.status.engaged == 1 and catalog.get(k.key) is None
    tick(catalog, guard, clock, 5.0)
    assert catalog.get(k.key) is None and k.key not in guard.held()


def test_a_drain_put_back_by_a_resync_that_shows_it_gone_goes_as_a_delete() -> None:
    """Drained by another writer (its stamp kept), applied at once; a resync then shows it gone
    and makes the burst a wipe: held, then released as the delete the registry shows, not as
    the drain (a draining record no longer in the registry, kept until the next resync)."""
    instances = [replace(i, written_at=50.0) for i in fleet()]
    catalog, guard, clock = setup(instances)
    k = instances[0]
    feed(catalog, guard, put(replace(k, state=State.DRAINING)))
    assert catalog.get(k.key) is not None and catalog.get(k.key).state is State.DRAINING
    snapshot = Snapshot({i.key: i for i in instances[40:]}, revision=5)
    feed(catalog, guard, Change("reset", snapshot=snapshot, revision=5))
    assert guard.status.engaged == 1 and catalog.get(k.key) == k  # put back, up, held
    for i in instances[1:40]:  # the others' agents write theirs back
        feed(catalog, guard, put(replace(i, written_at=60.0)))
    tick(catalog, guard, clock, 5.0)
    assert catalog.get(k.key) is None


def test_removals_a_resync_applied_are_put_back_when_the_burst_turns_out_a_wipe() -> None:
    """A resync shows 20 of 50 gone (each leaving its service others): applied; the deletes
    after it make the burst a wipe: those 20 come back with the rest."""
    instances = fleet()
    catalog, guard, _ = setup(instances)
    first = {i.key for n, i in enumerate(instances) if n % 10 < 4}  # 4 of each service
    snapshot = Snapshot({i.key: i for i in instances if i.key not in first}, revision=5)
    feed(catalog, guard, Change("reset", snapshot=snapshot, revision=5))
    assert guard.status.engaged == 0 and catalog.size() == 30
    for i in sorted((i for i in instances if i.key not in first), key=lambda i: i.key)[:10]:
        feed(catalog, guard, delete(i))
    assert guard.status.engaged == 1 and catalog.size() == 50


def test_a_put_back_is_marked_so_that_it_is_not_timed_as_a_write() -> None:
    instances = fleet()
    catalog, guard, _ = setup(instances)
    puts: list[Change] = []
    for i in sorted(instances, key=lambda i: i.key):
        for c in guard.filter(delete(i)):
            catalog.apply(c)
            puts += [c] if c.kind == "put" else []
    assert puts and all(c.put_back for c in puts)


def test_a_service_a_sighup_stopped_following_is_never_put_back() -> None:
    """A removal of api applied in a burst, then a SIGHUP that stops following api (a scoped
    reset), then the burst becomes a wipe by deletes of web: api's instance was put back in
    the catalog and held 45 s (catalog, last-catalog file, held_services, metrics)."""
    t = [100.0]

    def on(service: str, n: int) -> Instance:
        return Instance(service=service, id=f"n{n}:{n:012x}:80", node=f"n{n}",
                        address="192.0.2.1", port=8000 + n)

    web = [on("web", n) for n in range(1, 5)]
    api = [on("api", n) for n in range(1, 5)]
    catalog = Catalog()
    guard = WipeGuard(catalog, GuardSettings(), clock=lambda: t[0])

    def apply(changes: list[Change]) -> None:
        for c in changes:
            catalog.apply(c)

    apply(guard.filter(Change("reset", snapshot=Snapshot({i.key: i for i in web + api}, 5))))
    t[0] += 0.1
    apply(guard.filter(Change("delete", key=api[0].key, revision=6)))  # api has others
    t[0] += 0.1
    scoped = Snapshot({i.key: i for i in web}, 7, scope=frozenset({"web"}))
    apply(guard.filter(Change("reset", snapshot=scoped, revision=7)))
    for n, i in enumerate(web):
        t[0] += 0.1
        apply(guard.filter(Change("delete", key=i.key, revision=8 + n)))
    assert guard.wiping()
    assert catalog.services().keys() == {"web"} and "api" not in guard.held_services()
