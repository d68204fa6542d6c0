"""Pre-allocated server slots per HAProxy backend.

Each backend has a fixed number of ``server`` lines (``s1`` .. ``sN``). Instances take a
free slot; an instance that leaves frees its slot (the server goes to ``maint``). So
membership changes are runtime-API calls on existing slots, never reloads; only running
out of slots changes the structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from discovery.model import Instance, State

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
        return cls(name, instance.address, instance.port, instance.weight, state, instance.id)


def slot_count(instances: int, minimum: int = 8) -> int:
    """Slots to allocate for ``instances``: room to grow by half before the next reload, rounded
    up to a power of two (10 instances: 16 slots)."""
    want = max(minimum, instances + instances // 2 + 1)
    size = minimum
    while size < want:
        size *= 2
    return size


class SlotTable:
    """Which instance sits in which slot of one backend; stable across changes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._by_id: dict[str, int] = {}
        self._slots: list[Instance | None] = [None] * size
        self.overflow = 0

    def assign(self, instances: dict[str, Instance]) -> dict[str, Slot]:
        """Place ``instances`` (by id); returns the slots that changed.

        When there are more instances than slots, the ones that do not fit are left out
        (``overflow`` counts them): the caller grows the table with a reload.
        """
        self.overflow = 0
        changed: dict[str, Slot] = {}
        for iid in [i for i in self._by_id if i not in instances]:
            gone = self._by_id.pop(iid)
            self._slots[gone] = None
            changed[self.name(gone)] = Slot(self.name(gone))
        for iid, inst in sorted(instances.items()):
            index = self._by_id.get(iid)
            if index is None:
                free = [n for n, s in enumerate(self._slots) if s is None]
                if not free:
                    self.overflow += 1
                    continue
                index = free[0]
                self._by_id[iid] = index
            current = self._slots[index]
            if current is None or not current.same_registration(inst):
                self._slots[index] = inst
                changed[self.name(index)] = Slot.of(self.name(index), inst)
        return changed

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
