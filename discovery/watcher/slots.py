"""Pre-allocated server slots per HAProxy backend.

Each backend has a fixed number of ``server`` lines (``s1`` .. ``sN``). Instances take a
free slot; an instance that leaves frees its slot (the server goes to ``maint``). So
membership changes are runtime-API calls on existing slots, never reloads; only running
out of slots changes the structure.

A freed slot is never given to a new address while it still has sessions (HAProxy's ``scur``):
slots that never served go first, then freed ones, longest free first, skipping busy ones; when
every free slot is busy the instance waits (``overflow``), and a reload places it (the new
worker's slots have no sessions).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from discovery.errors import ValidationError
from discovery.model import Instance, State
from discovery.model.endpoint import Endpoint

SlotState = Literal["ready", "drain", "maint"]
EMPTY_ADDRESS = "127.0.0.1"
EMPTY_PORT = 1  # an unused slot points nowhere useful and is in maint


@dataclass(frozen=True)
class Slot:
    """One ``server`` line of a backend, as HAProxy should have it."""

    name: str
    address: str = EMPTY_ADDRESS
    port: int = EMPTY_PORT
    weight: int = 0
    state: SlotState = "maint"
    instance_id: str = ""

    @classmethod
    def of(cls, name: str, instance: Instance | None) -> Slot:
        if instance is None:
            return cls(name)
        state: SlotState = "drain" if instance.state is State.DRAINING else "ready"
        try:  # canonical, as HAProxy shows it back: an adopted server that has it matches
            address = Endpoint.parse(instance.id, instance.address, instance.port).address
        except ValidationError:  # (refused where the slot is set: haproxy.slot_commands)
            address = instance.address
        return cls(name, address, instance.port, instance.weight, state, instance.id)


#: the most slots of one backend: a runaway writer (one service's instances by the ten
#: thousand, on every host that routes it) gets this far and no further; each server costs
#: HAProxy ~4 KB a process (65,536: ~256 MB)
MAX_SLOTS = 65_536


def slot_count(instances: int, minimum: int = 8) -> int:
    """Slots to allocate for ``instances``: room to grow by half before the next reload, rounded
    up to a power of two (10 instances: 16 slots), :data:`MAX_SLOTS` at most."""
    want = max(minimum, instances + instances // 2 + 1)
    size = minimum
    while size < want and size < MAX_SLOTS:
        size *= 2
    return min(size, MAX_SLOTS)


class SlotTable:
    """Which instance sits in which slot of one backend; stable across changes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._by_id: dict[str, int] = {}
        self._slots: list[Instance | None] = [None] * size
        self._freed: dict[int, int] = {}  # slot index -> when it was freed (sequence number)
        self._clock = itertools.count()
        self.overflow = 0

    def assign(self, instances: dict[str, Instance],
               busy: Callable[[str], bool] | None = None) -> dict[str, Slot]:
        """Place ``instances`` (by id); returns the slots that changed. ``busy(slot name)``:
        whether a freed slot still has sessions (asked only about slots that served before).

        When there are more instances than usable slots, the ones that do not fit are left out
        (``overflow`` counts them): the caller grows the table with a reload.
        """
        self.overflow = 0
        changed: dict[str, Slot] = {}
        for iid in [i for i in self._by_id if i not in instances]:
            gone = self._by_id.pop(iid)
            self._slots[gone] = None
            self._freed[gone] = next(self._clock)
            changed[self.name(gone)] = Slot(self.name(gone))
        picks = self._free_slots(busy, set(changed))
        for iid, inst in sorted(instances.items()):
            index = self._by_id.get(iid)
            if index is None:
                found = next(picks, None)
                if found is None:
                    self.overflow += 1
                    continue
                index = found
                self._freed.pop(index, None)
                self._by_id[iid] = index
            current = self._slots[index]
            if current is None or not current.same_registration(inst):
                self._slots[index] = inst
                changed[self.name(index)] = Slot.of(self.name(index), inst)
        return changed

    def _free_slots(self, busy: Callable[[str], bool] | None, just_freed: set[str],
                    ) -> Iterator[int]:
        """The free slots to give out, best first: those that never served, then the
        longest-freed ones without sessions (a slot freed in this very call still has its
        sessions as far as HAProxy knows). Listed once a call, when first asked (once per
        instance, 21,846 new instances took ~95 s)."""
        free = [n for n, s in enumerate(self._slots) if s is None]
        yield from (n for n in free if n not in self._freed)
        for n in sorted((n for n in free if n in self._freed), key=self._freed.__getitem__):
            name = self.name(n)
            if name in just_freed and busy is not None:
                continue
            if busy is None or not busy(name):
                yield n

    def ids(self) -> dict[str, str]:
        """Slot name -> the id of the instance in it, for the slots in use."""
        return {self.name(n): inst.id for n, inst in enumerate(self._slots) if inst is not None}

    @staticmethod
    def name(index: int) -> str:
        return f"s{index + 1}"

    def resized(self, size: int, instances: dict[str, Instance]) -> SlotTable:
        """A table of ``size`` slots holding ``instances``, each kept in its old slot if it can."""
        table = SlotTable(size)
        for iid, index in self._by_id.items():
            if iid in instances and index < size:
                table._by_id[iid] = index
                table._slots[index] = instances[iid]
        table.assign(instances)
        return table

    def slots(self) -> list[Slot]:
        return [Slot.of(self.name(n), inst) for n, inst in enumerate(self._slots)]

    def slot(self, name: str) -> Slot | None:
        """The slot ``name`` (``s1``…) as HAProxy should have it; None: no such slot."""
        n = int(name[1:]) - 1
        return Slot.of(name, self._slots[n]) if 0 <= n < self.size else None
