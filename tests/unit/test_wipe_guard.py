"""The wipe guard (watcher/guard.py): both sides of the rule, with a fake clock.

A wipe (half the catalog removed at once) never empties a service; a normal scale-down, or
stopping the last instance, still stops traffic to it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from discovery.agent.config import AgentConfig
from discovery.cli.agent import agent as agent_command
from discovery.errors import ConfigError
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard import GuardSettings, WipeGuard

HOLD = GuardSettings().hold


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def inst(service: str, n: int, state: State = State.UP) -> Instance:
    return Instance(service=service, id=f"h{n}:{n:012x}:80", node=f"h{n}",
                    address="192.0.2.1", port=8000 + n, state=state)


def setup(instances: list[Instance]) -> tuple[Catalog, WipeGuard, Clock]:
    catalog, clock = Catalog(), Clock()
    catalog.load(Snapshot({i.key: i for i in instances}, revision=1))
    return catalog, WipeGuard(catalog, clock=clock), clock


def feed(catalog: Catalog, guard: WipeGuard, change: Change) -> None:
    for c in guard.filter(change):
        catalog.apply(c)


def tick(catalog: Catalog, guard: WipeGuard, clock: Clock, seconds: float) -> None:
    clock.now += seconds
    for c in guard.due():
        catalog.apply(c)


def delete(i: Instance) -> Change:
    return Change("delete", key=i.key, revision=2)


def put(i: Instance) -> Change:
    return Change("put", key=i.key, instance=i, revision=3)


def ids(catalog: Catalog, service: str | None = None) -> set[str]:
    return {i.id for i in catalog.instances(service)}


def test_a_removal_that_leaves_an_instance_up_is_applied_at_once() -> None:
    a1, a2, b1, c1, d1 = inst("a", 1), inst("a", 2), inst("b", 3), inst("c", 4), inst("d", 5)
    catalog, guard, _ = setup([a1, a2, b1, c1, d1])
    feed(catalog, guard, delete(a1))
    assert ids(catalog, "a") == {a2.id}
    assert guard.next_due() is None


def test_stopping_the_last_instance_stops_traffic_after_settle() -> None:
    a1, b1, c1, d1 = inst("a", 1), inst("b", 2), inst("c", 3), inst("d", 4)
    catalog, guard, clock = setup([a1, b1, c1, d1])
    feed(catalog, guard, delete(a1))
    assert ids(catalog, "a") == {a1.id}  # settling: still served for 0.2 s
    tick(catalog, guard, clock, 0.1)
    assert ids(catalog, "a") == {a1.id}
    tick(catalog, guard, clock, 0.15)
    assert ids(catalog, "a") == set()
    assert guard.status.holding == 0 and guard.status.engaged == 0


def test_a_draining_last_instance_goes_at_once() -> None:
    a1, b1 = inst("a", 1, State.DRAINING), inst("b", 2)
    catalog, guard, _ = setup([a1, b1])
    feed(catalog, guard, delete(a1))
    assert ids(catalog, "a") == set()


def test_drained_deletes_of_up_entries_are_departures() -> None:
    """A delete read too late to see its ``draining`` record (ZooKeeper: ``drained``) is the
    agent's departure, like the delete of a draining entry: never counted, never held."""
    fleet = [inst(s, n) for n, s in enumerate(["a", "a", "b", "c"], start=1)]
    catalog, guard, clock = setup(fleet)
    for i in fleet[1:]:  # three of four: a wipe, were they bare deletes
        feed(catalog, guard, Change("delete", key=i.key, revision=2, drained=True))
    assert ids(catalog) == {fleet[0].id}
    tick(catalog, guard, clock, 0.3)
    assert guard.status.engaged == 0 and guard.status.holding == 0


def test_a_single_host_with_one_instance_is_no_wipe() -> None:
    a1 = inst("a", 1)
    catalog, guard, clock = setup([a1])
    feed(catalog, guard, delete(a1))
    tick(catalog, guard, clock, 0.3)
    assert ids(catalog) == set()  # 1 removal < min_removed: the last instance really went


def test_all_of_a_small_catalog_of_two_nodes_is_a_wipe_one_nodes_is_not() -> None:
    """A client following a service of two instances (fewer than ``min_removed``): a wipe
    emptied it in every process of the fleet at once. All of the catalog removed in one burst,
    of more than one node, is a wipe; both of one host's (its death) are not."""
    a1, a2 = inst("a", 1), inst("a", 2)
    catalog, guard, clock = setup([a1, a2])
    feed(catalog, guard, delete(a1))  # another instance serves: gone at once (rule 2)
    feed(catalog, guard, delete(a2))  # the last: with it, all of the catalog, two nodes
    assert ids(catalog) == {a1.id, a2.id}  # held, and a1 put back: "a" never empty
    tick(catalog, guard, clock, 10.0)
    assert ids(catalog) == {a1.id, a2.id} and guard.status.engaged == 1
    one_host = [inst("b", 3), replace(inst("b", 4), node="h3")]
    catalog, guard, clock = setup(one_host)
    for i in one_host:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 0.3)
    assert ids(catalog) == set() and guard.status.engaged == 0


def test_every_lease_revoked_is_held_and_released_as_agents_come_back() -> None:
    fleet = [inst(s, n) for n, s in enumerate(["a", "a", "b", "b", "c", "c"], start=1)]
    catalog, guard, clock = setup(fleet)
    for i in fleet:  # a stuck leader revokes every lease: deletes arrive back to back
        feed(catalog, guard, delete(i))
    # the first went before the wipe was seen (it left its service an instance), and was put
    # back when it was: held, as every instance removed in the wipe
    assert ids(catalog) == {i.id for i in fleet}
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 1 and guard.status.holding == 6
    tick(catalog, guard, clock, 5.0)  # still no agent back: nothing is released
    assert guard.status.holding == 6
    for i in fleet[:3]:  # agents re-register (same ids)
        feed(catalog, guard, put(i))
    assert ids(catalog, "a") == {fleet[0].id, fleet[1].id}
    assert guard.status.holding == 3  # b's second and c's two
    tick(catalog, guard, clock, 1.0)
    # wipe over, b has an up instance again: its unreturned one goes; c keeps its held ones
    assert ids(catalog, "b") == {fleet[2].id}
    assert ids(catalog, "c") == {fleet[4].id, fleet[5].id}
    assert guard.status.holding == 2
    tick(catalog, guard, clock, HOLD - 2.0)  # hold since they were held: still held, as
    assert ids(catalog, "c") == {fleet[4].id, fleet[5].id}  # others came back 5 s after
    tick(catalog, guard, clock, 0.9)  # (test_wipe_guard_hold.py)
    assert ids(catalog, "c") == {fleet[4].id, fleet[5].id}
    tick(catalog, guard, clock, 0.2)  # c's agents never came back: released, hold after the
    assert ids(catalog, "c") == set() and guard.status.holding == 0  # last one back


def test_the_default_hold_outlasts_the_agents_default_reconcile() -> None:
    """An agent with no watch of its own instances (``discovery agent`` alone) puts back what
    a wipe deleted under its live lease only at its reconcile, every ``--resync`` s ±10 %:
    the held instances of a service with nothing else serving must wait for it (at 30 s they
    did not, and its services went empty)."""
    resync = next(p.default for p in agent_command.params if p.name == "resync")
    assert resync == AgentConfig.resync  # (the CLI's and the config file's)
    assert isinstance(resync, float) and resync * 1.1 + 10.0 < HOLD  # (a reconcile's own time)


def test_a_reset_that_drops_everything_keeps_everything() -> None:
    fleet = [inst(s, n) for n, s in enumerate(["a", "b", "c", "d"], start=1)]
    catalog, guard, clock = setup(fleet)
    feed(catalog, guard, Change("reset", snapshot=Snapshot({}, revision=9), revision=9))
    assert ids(catalog) == {i.id for i in fleet}
    tick(catalog, guard, clock, 0.3)
    assert guard.status.holding == 4 and ids(catalog) == {i.id for i in fleet}
    new_a = inst("a", 9)
    feed(catalog, guard, Change("reset", snapshot=Snapshot({new_a.key: new_a}, revision=10),
                                revision=10))
    tick(catalog, guard, clock, 2.5)  # wipe over; a is served by its new instance
    assert ids(catalog, "a") == {new_a.id}
    assert ids(catalog, "b") == {fleet[1].id}  # b, c, d: nothing else up, still held
    tick(catalog, guard, clock, 1.0)
    feed(catalog, guard, Change("reset", snapshot=Snapshot({new_a.key: new_a}, revision=11),
                                revision=11))  # the same again: what it holds is no new wipe
    assert guard.status.engaged == 1 and guard.status.holding == 3


def test_a_rolling_replacement_is_never_held() -> None:
    old = [inst("a", n) for n in range(1, 5)]
    new = [inst("a", n) for n in range(11, 15)]
    catalog, guard, clock = setup([*old, inst("b", 20), inst("c", 21), inst("d", 22),
                                   inst("e", 23)])
    for o, n in zip(old, new, strict=True):  # start new, then stop the oldest
        feed(catalog, guard, put(n))
        feed(catalog, guard, delete(o))
    assert ids(catalog, "a") == {n.id for n in new}
    tick(catalog, guard, clock, 0.3)
    assert guard.status.holding == 0


def test_disabled_guard_applies_everything() -> None:
    a1 = inst("a", 1)
    catalog = Catalog()
    catalog.load(Snapshot({a1.key: a1}, revision=1))
    guard = WipeGuard(catalog, GuardSettings(enabled=False))
    feed(catalog, guard, delete(a1))
    assert ids(catalog) == set()


@pytest.mark.parametrize(("value", "culprit"), [
    ("yes", "must be a table"), ({"holdd": "1s"}, "wipe_guard.holdd"),
    ({"hold": "2h"}, "wipe_guard.hold"), ({"fraction": 0}, "wipe_guard.fraction"),
    ({"fraction": True}, "wipe_guard.fraction"), ({"min_removed": 0}, "min_removed"),
])
def test_bad_settings_are_one_config_error_naming_the_key(value: object, culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit):
        GuardSettings.parse(value)


def test_settings_parse() -> None:
    assert GuardSettings.parse(False) == GuardSettings(enabled=False)
    got = GuardSettings.parse({"hold": "1m", "settle": "100ms", "fraction": 0.3})
    assert (got.hold, got.settle, got.fraction, got.min_removed) == (60.0, 0.1, 0.3, 3)


def test_a_reset_forgets_a_settling_removal_it_does_not_keep() -> None:
    """web/A settles (its service's last up instance); a reset brings B and C instead: A is
    gone for good and no longer counts against web's up instances, so when a wipe then takes
    B, B goes once the wipe is over (C is up), not after the whole hold."""
    a, b, c = inst("web", 1), inst("web", 2), inst("web", 3)
    others = [inst("x", n) for n in range(10, 14)]
    cat, guard, clock = setup([a, *others])
    feed(cat, guard, delete(a))
    assert ids(cat, "web") == {a.id}  # settling: still in the catalog
    snap = {i.key: i for i in (b, c, *others)}
    feed(cat, guard, Change("reset", snapshot=Snapshot(snap, revision=5)))
    assert sorted(ids(cat, "web")) == [b.id, c.id]
    for i in others:
        feed(cat, guard, delete(i))
    feed(cat, guard, delete(b))
    tick(cat, guard, clock, 0.3)
    assert guard.wiping() and b.key in guard.held()
    tick(cat, guard, clock, 3.0)  # the wipe is over; web has C up
    assert not guard.wiping() and sorted(ids(cat, "web")) == [c.id]


def test_a_service_the_registry_withheld_keeps_what_the_catalog_had() -> None:
    """A reset that could not read one service (its role or ACL denies it now) names it
    withheld: its instances stay as they were, neither removed nor held, while the services it
    did read are applied (a departure in one of them too). Without ``withheld`` the reset
    emptied that service on every host (a small service: applied after the settle)."""
    fleet = [inst("big", n) for n in range(1, 9)] + [inst("api", 20), inst("web", 30)]
    catalog, guard, clock = setup(fleet)
    read = {i.key: i for i in fleet if i.service == "big" and i.id != fleet[0].id}
    feed(catalog, guard, Change("reset", snapshot=Snapshot(
        read, revision=9, withheld=frozenset({"api", "web"})), revision=9))
    tick(catalog, guard, clock, 0.3)
    assert ids(catalog, "api") == {fleet[8].id} and ids(catalog, "web") == {fleet[9].id}
    assert ids(catalog, "big") == {i.id for i in fleet[1:8]}  # its departure applied
    assert guard.status.holding == 0 and catalog.size() == 9
    assert catalog.serving_count("api") == 1
    catalog.load(Snapshot(read, revision=10))  # read again, nothing withheld: the truth
    assert ids(catalog, "api") == set() and catalog.size() == 7


def test_entries_a_reset_could_not_read_keep_their_last_good_value() -> None:
    """A reset that found some entries there but unreadable (a newer schema, a node's own ACL)
    names them ``unreadable``: each keeps the value the catalog had, is neither removed nor
    held, and counts toward no wipe; an entry the catalog never had is not made up."""
    fleet = [inst("web", n) for n in range(1, 7)]
    catalog, guard, clock = setup(fleet)
    read = {i.key: i for i in fleet[3:]}
    unread = frozenset({i.key for i in fleet[:3]} | {("web", "never-had")})
    feed(catalog, guard, Change("reset", snapshot=Snapshot(read, revision=9,
                                                           unreadable=unread), revision=9))
    tick(catalog, guard, clock, 3.0)
    assert ids(catalog, "web") == {i.id for i in fleet}  # half the catalog: no wipe either
    assert guard.status.holding == 0 and guard.status.engaged == 0 and catalog.size() == 6
    catalog.load(Snapshot(read, revision=10))  # read again, all readable: the truth
    assert ids(catalog, "web") == {i.id for i in fleet[3:]}


def test_a_settling_removal_a_reset_finds_unreadable_is_not_applied() -> None:
    """A service's last instance deleted (settling), then a reset finds its entry there again
    but unreadable: it is back, so the catalog keeps its last good value and the removal is
    dropped, not applied when due."""
    lone, others = inst("lone", 1), [inst("big", n) for n in range(100, 120)]
    catalog, guard, clock = setup([lone, *others])
    feed(catalog, guard, delete(lone))
    assert guard.status.settling == 1
    feed(catalog, guard, Change("reset", snapshot=Snapshot(
        {i.key: i for i in others}, revision=9, unreadable=frozenset({lone.key})), revision=9))
    assert guard.status.settling == 0
    tick(catalog, guard, clock, 3.0)
    assert ids(catalog, "lone") == {lone.id} and guard.status.engaged == 0


def test_a_wipe_slower_than_the_window_is_still_a_wipe() -> None:
    """etcd revokes expired leases at most 1,000 a second: a whole fleet's go over many
    seconds. A burst of removals each within ``window`` of the one before is one wipe,
    however long it lasts (a sliding 2 s window never saw half the catalog go)."""
    fleet = [inst(f"s{n % 10}", n) for n in range(20)]
    catalog, guard, clock = setup(fleet)
    for i in fleet:
        feed(catalog, guard, delete(i))
        tick(catalog, guard, clock, 0.5)  # 10 s in all
    assert guard.status.engaged == 1
    assert all(ids(catalog, f"s{n}") for n in range(10))  # no service emptied


@pytest.mark.parametrize(("size", "per_service", "pace", "look_every"), [
    (20_000, 10, 0.00005, 100),  # one DeleteRange, key order, as etcd sends: 1 s in all
    (1_000, 20, 0.005, 10)])  # ZooKeeper's deletes to a loaded watcher: 200 a second, 5 s
def test_a_prefix_deleted_at_once_empties_no_service(size: int, per_service: int, pace: float,
                                                     look_every: int) -> None:
    """A prefix deleted at once reaches the watcher as a stream it takes a while to apply
    (the main loop looking every ``look_every`` deletes): the services emptied before half
    the catalog went (their last instance settled after 0.2 s) wait while the stream goes
    on, and are held once it is seen to be a wipe. ZooKeeper deletes node by node, service
    after service, and a watcher whose CPU a fleet's reads took (every host of 100 reading
    the wave) got 1,000 deletes over seconds: the services emptied in its first 2 s went
    while ``window`` was the most a last instance waited (22 of 50 services empty,
    ``bench/written_back.py --follow all``)."""
    fleet = [inst(f"s{n // per_service:04d}", n) for n in range(size)]
    catalog, guard, clock = setup(fleet)
    for n, i in enumerate(sorted(fleet, key=lambda i: i.key)):
        feed(catalog, guard, delete(i))
        clock.now += pace
        if n % look_every == 0:
            tick(catalog, guard, clock, 0)
    tick(catalog, guard, clock, 0.5)
    assert guard.status.engaged == 1
    empty = [s for s in {i.service for i in fleet} if not ids(catalog, s)]
    assert not empty, len(empty)


def test_crashes_replaced_as_they_come_never_add_up_to_a_wipe() -> None:
    """A bare removal every 1.5 s (crashes, expiries), each replaced a second later: one long
    burst, but it never makes half the catalog within ``horizon`` (30 s), so it starts again
    and nothing is ever held (counted for ever, it reached half the catalog after 45 s, and
    the guard then held every dead instance for ``hold`` while the trickle lasted; within
    ``hold`` once that became 45 s)."""
    fleet = [inst(f"s{n % 20}", n) for n in range(60)]
    catalog, guard, clock = setup(fleet)
    for n, gone in enumerate(fleet + fleet[:20]):  # 80 removals over 120 s
        feed(catalog, guard, delete(gone))
        tick(catalog, guard, clock, 1.0)
        feed(catalog, guard, put(inst(gone.service, 1000 + n)))  # its replacement
        tick(catalog, guard, clock, 0.5)
    assert guard.status.engaged == 0 and guard.status.holding == 0


def big_and_small() -> tuple[list[Instance], list[Instance]]:
    """A service of 2,000 instances beside 100 services of 10: two thirds of the catalog is
    the big one, so a wipe of every other service is a third of the catalog."""
    big = [inst("big", n) for n in range(2000)]
    return big, [inst(f"s{s:03d}", 10_000 + s * 10 + k) for s in range(100) for k in range(10)]


def test_one_large_service_does_not_hide_a_wipe_of_all_the_others() -> None:
    big, small = big_and_small()
    catalog, guard, clock = setup(big + small)
    for i in small:  # deleted one after the other, 1 ms apart: the big service untouched
        clock.now += 0.001
        feed(catalog, guard, delete(i))
    assert guard.status.engaged == 1  # 100 of 101 services left with none up
    tick(catalog, guard, clock, 0.5)
    assert all(catalog.serving_count(f"s{s:03d}") >= 1 for s in range(100)), "a service emptied"
    for i in small:  # the agents come back
        feed(catalog, guard, put(i))
    tick(catalog, guard, clock, 2.5)
    assert guard.status.holding == 0 and catalog.size() == 3000


def test_one_large_service_does_not_hide_a_wipe_read_by_a_reset() -> None:
    big, small = big_and_small()
    catalog, guard, clock = setup(big + small)
    feed(catalog, guard, Change("reset", snapshot=Snapshot({i.key: i for i in big}, 5)))
    assert guard.status.engaged == 1 and catalog.size() == 3000
    tick(catalog, guard, clock, 0.5)
    assert catalog.size() == 3000


def test_a_host_that_was_half_the_services_only_home_is_no_wipe() -> None:
    """Three of six services lived on one host only (3 of 12 instances): that host's death
    takes them away after `settle`. Services emptied from one node never make a wipe."""
    others = [inst(f"s{s}", 10 + s * 10 + k) for s in range(3) for k in range(3)]
    lone = [Instance(service=name, id=f"a:{n:012x}:80", node="a", address="192.0.2.1",
                     port=8000 + n) for n, name in enumerate("xyz")]
    catalog, guard, clock = setup(others + lone)
    for i in lone:
        feed(catalog, guard, delete(i))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 0 and catalog.size() == 9


def test_a_service_that_empties_again_and_again_counts_once() -> None:
    """A lone instance that flaps (deleted, put back, deleted...) within the window leaves one
    service with none up, not one a flap: 1 of 4 services is no wipe."""
    x = inst("x", 1)
    others = [inst(f"s{s}", 10 + s * 10 + k) for s in range(3) for k in range(3)]
    catalog, guard, clock = setup([x, *others])
    for _ in range(4):
        feed(catalog, guard, delete(x))
        clock.now += 0.1
        feed(catalog, guard, put(x))
        clock.now += 0.1
    feed(catalog, guard, delete(x))
    tick(catalog, guard, clock, 0.25)
    assert guard.status.engaged == 0 and ids(catalog, "x") == set()


def test_a_service_a_reset_could_not_read_all_of_is_not_left_empty() -> None:
    """Its other instance is unreadable, so kept up: the gone one leaves at once, and the
    service counts as one still up (not as emptied)."""
    a1, a2 = inst("a", 1), inst("a", 2)
    rest = [inst(f"s{s}", 10 + s) for s in range(3)]
    catalog, guard, _ = setup([a1, a2, *rest])
    snapshot = Snapshot({i.key: i for i in rest}, 5, unreadable=frozenset({a2.key}))
    feed(catalog, guard, Change("reset", snapshot=snapshot))
    assert ids(catalog, "a") == {a2.id} and guard.next_due() is None
