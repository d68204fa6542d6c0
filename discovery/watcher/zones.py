"""Zone-aware routing and ejections, as the slots see them.

A watcher with a zone (``--zone`` or ``[watcher] zone``) routes each service to the instances
of its own zone, and spills over to every zone while its own has fewer than ``zone_min_up`` up
instances. Other zones are not left out of the backend: they sit in their slots at weight 0 (a
weight is what HAProxy 2.6 can change at runtime; ``backup`` it cannot), so spilling over and
coming back are runtime-API weight changes, never a reload. Instances without a zone count as
another zone. Ejected instances (:mod:`discovery.watcher.outlier`) are drained. With
``check = true`` the local instances HAProxy's checks hold down do not count as up
(:class:`~discovery.watcher.stat_reads.CheckedDown`, read every second at most): a local
instance the registry calls up but HAProxy cannot reach no longer keeps the other zones at
weight 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import replace

from discovery.model import Instance, State


def local_up(instances: Mapping[str, Instance], zone: str, ejected: AbstractSet[str]) -> int:
    """Instances of ``zone`` serving (up, weight above 0) and not ejected."""
    return sum(1 for i in instances.values()
               if i.zone == zone and i.serving and i.id not in ejected)


def steer(instances: dict[str, Instance], zone: str, min_up: int,
          ejected: set[str], down: AbstractSet[str] = frozenset()) -> dict[str, Instance]:
    """``instances`` as the slots should carry them: other zones at weight 0 while the local
    zone has ``min_up`` up instances (neither ejected nor held ``down`` by HAProxy's checks),
    ejected ones draining. Unchanged ones are the same objects (no copy on the hot path)."""
    if not ejected and (not zone or not instances):
        return instances
    spill = not zone or local_up(instances, zone, ejected | down) < min_up
    out = {}
    for iid, inst in instances.items():
        if iid in ejected and inst.state is State.UP:
            inst = replace(inst, state=State.DRAINING)
        if not spill and inst.zone != zone and inst.weight:
            inst = replace(inst, weight=0)
        out[iid] = inst
    return out
