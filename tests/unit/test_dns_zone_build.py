"""A DNS zone taken from the zone before and the services changed since is the zone built whole.

Random changes to a catalog (records coming, going, moving address, node or state, tags and
zones, records that only claim a node, records that bypassed the model, whole resets); after
each batch the zone built from the last one (:meth:`Zone.from_catalog` with ``before``) must
answer as the one built from the whole catalog: the same members and SRV targets, node and
address names, empty non-terminals, and warnings held."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from discovery.lookup.dns_zone import Zone
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot

SERVICES = ("web", "db", "api", "cache")
NODES = ("h1", "h2", "h3", "h4", "h5")
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "127.0.9.9")


def record(rng: random.Random) -> Instance:
    node = rng.choice(NODES)
    owner = node if rng.random() < 0.8 else rng.choice(NODES)  # else: it only claims ``node``
    inst = Instance(service=rng.choice(SERVICES), id=f"{owner}:{rng.randrange(12):012x}:80",
                    node=node, address=rng.choice(ADDRESSES), port=80,
                    tags=tuple(sorted(rng.sample(("blue", "green", "v1"), rng.randrange(3)))),
                    zone=rng.choice(("", "", "a", "b")),
                    state=State.UP if rng.random() < 0.8 else State.DRAINING)
    if rng.random() < 0.05:  # as if it had bypassed the model: never in an answer
        object.__setattr__(inst, "address", inst.address + "\n")
    return inst


def view(zone: Zone) -> tuple[object, ...]:
    return (zone.index, zone.loaded, zone.services, zone.nodes, zone.addrs,
            set(zone.parents))


def changes(rng: random.Random, catalog: Catalog) -> list[Change]:
    held = catalog.instances()
    out = []
    for _ in range(rng.randrange(1, 6)):
        if held and rng.random() < 0.3:
            out.append(Change("delete", rng.choice(held).key, revision=2))
        elif held and rng.random() < 0.3:  # the same record, moved
            old = rng.choice(held)
            new = replace(old, address=rng.choice(ADDRESSES),
                          state=rng.choice((State.UP, State.DRAINING)))
            out.append(Change("put", new.key, new, revision=2))
        else:
            new = record(rng)
            out.append(Change("put", new.key, new, revision=2))
    if rng.random() < 0.05:  # a reset: some of it kept, some new
        kept = [i for i in held if rng.random() < 0.5] + [record(rng) for _ in range(3)]
        out = [Change("reset", ("", ""), snapshot=Snapshot({i.key: i for i in kept}))]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_a_zone_taken_from_the_one_before_is_the_zone_built_whole(seed: int) -> None:
    rng = random.Random(seed)
    catalog = Catalog()
    catalog.seed([record(rng) for _ in range(5)])  # a last catalog from disk: not answered
    warned: set[tuple[str, ...]] = set()
    zone = Zone((), -1, loaded=False)
    zone = Zone.from_catalog(catalog, warned, zone)
    assert not zone.loaded and not zone.services
    catalog.load(Snapshot({i.key: i for i in (record(rng) for _ in range(20))}, revision=1))
    steps = outranked = 0
    whole = Zone.from_catalog(catalog)
    for _ in range(150):
        for change in changes(rng, catalog):
            catalog.apply(change)
        zone, before, was = Zone.from_catalog(catalog, warned, zone), zone, whole
        whole_warned: set[tuple[str, ...]] = set()
        whole = Zone.from_catalog(catalog, whole_warned)
        assert view(zone) == view(whole) and zone._records == whole._records
        assert warned == whole_warned
        held = zone._records.targets if zone._records is not None else {}
        assert set(held) <= {(n, b"node") for n in zone.nodes} | {(a, b"addr") for a in
                                                                   zone.addrs}
        # the zone before is as it was: it answers queries while the next is built; what it
        # was built from went to the next, so a zone built from it again is built whole
        if before.loaded:
            assert view(before) == view(was)
            again = Zone.from_catalog(catalog, None, before)
            assert view(again) == view(whole)
        steps += 1
        outranked += bool(warned)
    assert steps == 150 and outranked  # (some step had a node's claim outranked)
