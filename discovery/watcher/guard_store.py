"""The wipe guard's removals kept out of the catalog: settling or held, counted per service.

Pure bookkeeping, under the guard's lock (:mod:`discovery.watcher.guard` holds the rules): each
kept removal (:class:`Deferred`), the services they belong to, how many of them serve or leave
up when released (what :meth:`Deferrals.has_other` subtracts), and a heap of when each is looked
at again. Nothing here costs more the more it keeps.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.watcher.guard_burst import GuardStatus

Key = tuple[str, str]


@dataclass
class Deferred:
    instance: Instance  # as the catalog keeps it meanwhile (up)
    due: float
    since: float  # when it was removed from the registry (or drained by another writer)
    held_since: float | None = None
    pending: Change | None = None  # a foreign drain's put, applied at release; else a delete


def leaves_up(entry: Deferred) -> bool:
    """Whether releasing ``entry`` takes its instance out of up (not a drain to weight 0)."""
    after = entry.pending.instance if entry.pending is not None else None
    return after is None or after.state is not State.UP


class Deferrals:
    """The removals the guard keeps, by key; ``held``: those kept for a wipe."""

    def __init__(self, catalog: Catalog, status: GuardStatus) -> None:
        self.catalog, self.status = catalog, status
        self.entries: dict[Key, Deferred] = {}
        self.by_service: dict[str, set[str]] = {}  # service -> deferred instance ids
        # service -> how many of those serve; how many leave up when released (a delete, or a
        # drain; not a weight 0): what a service has besides them (has_other)
        self._serving: dict[str, int] = {}
        self._leaving_up: dict[str, int] = {}
        self.deadlines: list[tuple[float, Key]] = []  # heap; stale entries skipped
        self.held: set[Key] = set()

    def has_other(self, key: Key, inst: Instance) -> bool:
        """Another instance of ``key``'s service doing what ``inst`` does (serving, if it
        serves: HAProxy's; else up: DNS's and HTTP's), besides ``key`` and the deferred ones
        that stop doing it when released (all are up in the catalog as they were)."""
        service, entry = key[0], self.entries.get(key)
        if inst.serving:
            count, kept = self.catalog.serving_count, self._serving.get(service, 0)
            counted = entry is not None and entry.instance.serving
        else:
            count, kept = self.catalog.up_count, self._leaving_up.get(service, 0)
            counted = entry is not None and leaves_up(entry)
        current = self.catalog.get(key)
        mine = current is not None and not counted and (
            current.serving if inst.serving else current.state is State.UP)
        return count(service) - kept - mine > 0

    def add(self, key: Key, entry: Deferred) -> None:
        self.entries[key] = entry
        self.by_service.setdefault(key[0], set()).add(key[1])
        self.tally(key[0], entry, 1)
        heapq.heappush(self.deadlines, (entry.due, key))
        self.count()

    def hold(self, key: Key, entry: Deferred, now: float, hold: float) -> None:
        """``entry`` (kept already) held for a wipe, ``hold`` from ``now``."""
        entry.held_since, entry.due = now, now + hold
        heapq.heappush(self.deadlines, (entry.due, key))
        self.held.add(key)
        self.count()
        self.status.held_total += 1

    def pop(self, key: Key) -> Deferred | None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self.held.discard(key)
        self.count()
        self.tally(key[0], entry, -1)
        ids = self.by_service.get(key[0])
        if ids is not None:
            ids.discard(key[1])
            if not ids:
                del self.by_service[key[0]]
        return entry

    def tally(self, service: str, entry: Deferred, sign: int) -> None:
        for counts, counted in ((self._serving, entry.instance.serving),
                                (self._leaving_up, leaves_up(entry))):
            if counted:
                if left := counts.get(service, 0) + sign:
                    counts[service] = left
                else:
                    del counts[service]

    def again(self, entry: Deferred, until: float, now: float) -> bool:
        """``entry`` due again at ``until``, if that is still to come."""
        if until <= now:
            return False
        entry.due = until
        heapq.heappush(self.deadlines, (until, entry.instance.key))
        return True

    def due_keys(self, now: float) -> set[Key]:
        """The keys whose time came (popped off the heap)."""
        keys: set[Key] = set()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, key = heapq.heappop(self.deadlines)
            entry = self.entries.get(key)
            if entry is not None and entry.due <= now:
                keys.add(key)
        return keys

    def next_due(self) -> float | None:
        """Monotonic time of the next look, or None."""
        while self.deadlines:
            when, key = self.deadlines[0]
            entry = self.entries.get(key)
            if entry is not None and entry.due == when:
                return when
            heapq.heappop(self.deadlines)  # popped, or due again later: stale
        return None

    def count(self) -> None:
        self.status.holding = len(self.held)
        self.status.settling = len(self.entries) - len(self.held)
