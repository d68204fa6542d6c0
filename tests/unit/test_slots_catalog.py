"""Slot tables and the catalog: the pure logic under the watcher."""

from __future__ import annotations

import threading
import time

import pytest

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot
from discovery.watcher.slots import MAX_SLOTS, Slot, SlotTable, slot_count


def inst(n: int, service: str = "web", **kw: object) -> Instance:
    return Instance(service=service, id=f"h:{n:012x}:80", node="h", address="127.0.0.1",
                    port=8000 + n, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "minimum", "want"), [
    (0, 8, 8), (1, 8, 8), (5, 8, 8), (6, 8, 16), (10, 8, 16), (11, 8, 32), (100, 8, 256),
    (3, 1, 8), (0, 16, 16),
])
def test_slot_count_leaves_room_to_grow(n: int, minimum: int, want: int) -> None:
    assert slot_count(n, minimum) == want
    assert slot_count(n, minimum) >= n + n // 2


def test_slot_count_stops_at_the_most_a_backend_may_have() -> None:
    """A runaway writer (one service's instances by the ten thousand) gets ``MAX_SLOTS``
    slots, no more: HAProxy then still checks, starts and reloads the config."""
    assert slot_count(MAX_SLOTS // 2) == MAX_SLOTS == slot_count(10**6)
    assert slot_count(10**6, 4096) == MAX_SLOTS


def test_each_free_slot_is_looked_at_once_a_call() -> None:
    """Placing many new instances asks about each free slot at most once (it listed every
    slot again for each instance: 21,846 new instances took ~95 s on one host's watcher)."""
    table = SlotTable(4096)
    first = {i.id: i for i in map(inst, range(4096))}
    table.assign(first)
    asked: list[str] = []

    def busy(name: str) -> bool:
        asked.append(name)
        return int(name[1:]) % 2 == 0  # every other freed slot still has sessions

    second = {i.id: i for i in map(inst, range(5000, 7048))}  # all replaced: 4,096 freed
    table.assign(second, busy)  # freed in this very call: none usable, none asked
    assert not asked and table.overflow == 2048
    table.assign(second, busy)  # freed before: those without sessions take them
    assert table.overflow == 0 and len(asked) == len(set(asked)) <= 4096


def test_instances_keep_their_slots_and_freed_slots_go_to_maint() -> None:
    table = SlotTable(4)
    changed = table.assign({i.id: i for i in (inst(1), inst(2))})
    assert set(changed) == {"s1", "s2"} and changed["s1"].state == "ready"
    changed = table.assign({i.id: i for i in (inst(2), inst(3))})
    # 2 stays in s2; s1 goes to maint (its sessions finish there); 3 takes a never-used slot
    assert changed == {"s1": Slot("s1"), "s3": Slot.of("s3", inst(3))}
    assert table.assign({i.id: i for i in (inst(2), inst(3))}) == {}  # nothing changed
    drained = inst(2, state=State.DRAINING)
    assert table.assign({i.id: i for i in (drained, inst(3))})["s2"].state == "drain"


def test_a_slot_holds_the_address_as_haproxy_shows_it_back() -> None:
    """An address stored in another form (upper case, zeros written out) is the canonical one
    in the slot, so an adopted HAProxy's server that has it matches and is not set again."""
    from discovery.watcher.haproxy_proc import ServerView

    for stored in ("2001:DB8::1", "2001:db8:0:0:0:0:0:1"):
        slot = Slot.of("s1", Instance(service="web", id="n:1", node="n", address=stored,
                                      port=80))
        assert slot.address == "2001:db8::1"
        assert ServerView("be", "s1", "2001:db8::1", 80, 100, "ready", "running").matches(slot)


def test_overflow_places_what_fits_and_counts_the_rest() -> None:
    table = SlotTable(2)
    table.assign({i.id: i for i in (inst(1), inst(2), inst(3))})
    assert table.overflow == 1
    assert sum(1 for s in table.slots() if s.instance_id) == 2


def test_resized_keeps_positions() -> None:
    table = SlotTable(4)
    table.assign({i.id: i for i in (inst(1), inst(2), inst(3))})
    table.assign({i.id: i for i in (inst(2), inst(3))})  # s1 freed
    bigger = table.resized(8, {i.id: i for i in (inst(2), inst(3), inst(4))})
    names = {s.instance_id: s.name for s in bigger.slots() if s.instance_id}
    assert names == {inst(2).id: "s2", inst(3).id: "s3", inst(4).id: "s1"}


def test_same_registration_ignores_only_registered_at() -> None:
    a, b = inst(1, registered_at=1.0), inst(1, registered_at=2.0)
    assert a.same_registration(b)
    assert not a.same_registration(inst(1, weight=5))
    assert not a.same_registration(inst(1, meta={"k": "v"}))


def test_catalog_load_apply_index_and_filters() -> None:
    cat = Catalog()
    start = cat.index  # the clock at start (never repeated across restarts)
    one = inst(1)
    assert cat.load(Snapshot({i.key: i for i in (one, inst(2, tags=("blue",)))}, 5))
    assert cat.index == start + 1 and cat.revision == 5 and cat.count("web") == 2
    assert [i.port for i in cat.instances("web", tags=["blue"])] == [8002]
    assert not cat.apply(Change("put", one.key, one, revision=6))  # same record: no change
    assert cat.index == start + 1
    assert cat.apply(Change("put", inst(3, "api").key, inst(3, "api"), revision=7))
    assert cat.apply(Change("put", inst(2).key, inst(2, state=State.DRAINING), revision=8))
    assert [i.port for i in cat.instances("web", include_draining=False)] == [8001]
    assert cat.apply(Change("delete", inst(1).key, revision=9))
    assert not cat.apply(Change("delete", inst(1).key, revision=10))
    assert set(cat.services()) == {"web", "api"} and cat.count("web") == 1
    assert cat.apply(Change("reset", snapshot=Snapshot({}, 11)))
    assert cat.services() == {} and cat.count("api") == 0 and cat.revision == 11


def test_catalog_size_get_and_serving_count_follow_every_change() -> None:
    def one(n: int, service: str = "web", **kw: object) -> Instance:
        return inst(n, service, registered_at=1.0, **kw)

    cat = Catalog()
    cat.load(Snapshot({i.key: i for i in (one(1), one(2), one(3, "api"))}, 1))
    assert (cat.size(), cat.serving_count("web"), cat.get(one(2).key)) == (3, 2, one(2))
    assert not cat.load(Snapshot({i.key: i for i in (one(1), one(2), one(3, "api"))}, 2))
    cat.apply(Change("put", one(2).key, one(2, state=State.DRAINING), revision=3))
    assert (cat.size(), cat.serving_count("web")) == (3, 1)  # replaced, not added
    cat.apply(Change("put", one(4).key, one(4), revision=4))
    assert not cat.apply(Change("delete", one(9).key, revision=5))  # not there: no change
    assert (cat.size(), cat.serving_count("web"), cat.count("web")) == (4, 2, 3)
    cat.apply(Change("put", one(4).key, one(4, weight=0), revision=5))  # up, serves nothing
    assert (cat.size(), cat.serving_count("web"), cat.serving_services()) == (4, 1, 2)
    cat.apply(Change("delete", one(3, "api").key, revision=6))
    assert (cat.size(), cat.get(one(3, "api").key), cat.count("api")) == (3, None, 0)
    assert [i.key for i in cat.instances()] == [one(n).key for n in (1, 2, 4)]


def test_catalog_wait_returns_on_change_or_timeout() -> None:
    cat = Catalog()
    start = cat.index
    t0 = time.monotonic()
    assert cat.wait(start, timeout=0.2) == start
    assert time.monotonic() - t0 >= 0.19
    threading.Timer(0.1, lambda: cat.apply(Change("put", inst(1).key, inst(1)))).start()
    t0 = time.monotonic()
    assert cat.wait(start, timeout=5) == start + 1
    assert time.monotonic() - t0 < 2
