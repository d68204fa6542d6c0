"""The watcher's in-memory catalog: a consistent snapshot, then the registry's changes.

Everything that answers lookups (HAProxy, DNS, HTTP, JSON output) reads this, never the
registry per request. ``index`` grows by one with every effective change, for blocking
queries (``?index=N&wait=30s``). It starts at :data:`CLOCK_BASE`, so it never repeats across
restarts: a client holding an index of an earlier process must never be given that index
again with other data, or it misses the change for good.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from itertools import chain
from operator import attrgetter

from discovery.model import Instance, State
from discovery.registry.base import Change, Snapshot

Key = tuple[str, str]
#: the wall clock when this process started (imported this module), in microseconds: the base
#: of the restart-proof index. The next process starts later, so its base is above every index
#: this one reached unless this one made more than one change per microsecond on average.
#: About 1.8e15 today, below 2**53 (JSON clients keep it exact) until the year 2255.
CLOCK_BASE = time.time_ns() // 1000
#: the list of services and each one's tags (Consul's ``/v1/catalog/services``), as a service
#: of its own to :meth:`Catalog.wait` and :meth:`Catalog.modified`: it moves only when a
#: service comes or goes or its tags change. A lone surrogate, which no service's name holds
#: and no request's path decodes to (``unquote`` makes U+FFFD of bytes that are not UTF-8)
LISTING = "\udc80"
_by_id = attrgetter("id")


class Catalog:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # waiters on the catalog's index
        # service -> (its waiters' condition, on the same lock; how many wait): a change
        # wakes only those who wait for it (1,024 blocked queries woke on every change)
        self._waiting: dict[str, tuple[threading.Condition, int]] = {}
        # service → id → instance: the only copy (no second index by key: 10,000 tuples)
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._size = 0
        # service → how many of its instances are up; of those, serve (weight above 0)
        self._up: dict[str, int] = {}
        self._tags: dict[str, dict[str, int]] = {}  # service -> tag -> instances with it
        self._serving: dict[str, int] = {}
        self.revision = 0
        self.index = CLOCK_BASE
        self.loaded = False
        # service -> the index of its last change (a blocking query on one service waits for
        # that, not for any change anywhere); a service not in the catalog: ``_absent``, the
        # index when one last went (or the first load), so the names of services gone are not
        # kept for ever and a query blocked on one still wakes when it goes
        self._modified: dict[str, int] = {}
        self._absent = CLOCK_BASE

    def load(self, snapshot: Snapshot) -> bool:
        """Replace everything with ``snapshot`` (but what it withheld or could not read: kept
        as it was, :meth:`Snapshot.keeps`); True when that changed anything."""
        by_service: dict[str, dict[str, Instance]] = {}
        for (service, iid), inst in snapshot.instances.items():
            by_service.setdefault(service, {})[iid] = inst
        with self._cond:
            for service in snapshot.withheld & self._by_service.keys():
                by_service[service] = dict(self._by_service[service])
            for service, iid in snapshot.unreadable - snapshot.instances.keys():
                old = self._by_service.get(service, {}).get(iid)
                if old is not None:
                    by_service.setdefault(service, {})[iid] = old
            changed = self._by_service != by_service
            listed = self._listed()
            touched = {s for s in self._by_service.keys() | by_service.keys()
                       if self._by_service.get(s) != by_service.get(s)} if changed else set()
            if not self.loaded:  # the first load (after a seed: each service's own index too)
                touched |= by_service.keys()
            self._by_service, self._up, self._serving, self._tags = by_service, {}, {}, {}
            self._size = sum(map(len, by_service.values()))
            for members in by_service.values():
                for inst in members.values():
                    self._count(inst, 1)
            self.revision = max(self.revision, snapshot.revision)
            first, self.loaded = not self.loaded, True
            self._bump(changed or first)  # loaded is news too: blocked readers answer now
            for service in touched:
                self._touch(service)
            if first or self._listed() != listed:
                self._listing_moved()
            if first:
                self._absent = self.index
                self._absent_moved()
            return changed

    def seed(self, instances: Iterable[Instance]) -> int:
        """Before the first :meth:`load` only: ``instances`` (a watcher's last catalog, kept on
        disk) as what the catalog held, so that the first read is compared with them (the wipe
        guard). Not ``loaded``: nothing answers from them until then. How many it took."""
        with self._cond:
            if self.loaded:
                return 0
            for inst in instances:
                members = self._by_service.setdefault(inst.service, {})
                if (old := members.get(inst.id)) is not None:
                    self._count(old, -1)
                self._size += old is None
                members[inst.id] = inst
                self._count(inst, 1)
            return self._size

    def apply(self, change: Change) -> bool:
        """Apply one registry change; True when the catalog changed."""
        if change.kind == "reset":
            return self.load(change.snapshot or Snapshot())
        with self._cond:
            self.revision = max(self.revision, change.revision)
            service, iid = change.key
            listed = frozenset(self._tags[service]) if service in self._tags else None
            members = self._by_service.get(service)
            old = members.get(iid) if members is not None else None
            if old is not None:
                self._count(old, -1)
            if change.kind == "put" and change.instance is not None:
                changed = old != change.instance
                self._by_service.setdefault(service, {})[iid] = change.instance
                self._size += old is None
                self._count(change.instance, 1)
            else:
                changed = old is not None
                if members is not None and old is not None:
                    del members[iid]
                    self._size -= 1
                    if not members:
                        del self._by_service[service]
                        del self._tags[service]
            if self._bump(changed):
                self._touch(service)
                if listed != (frozenset(self._tags[service]) if service in self._tags else None):
                    self._listing_moved()
            return changed

    def _listed(self) -> dict[str, frozenset[str]]:
        return {service: frozenset(tags) for service, tags in self._tags.items()}

    def _listing_moved(self) -> None:
        """The services or their tags changed at this index (under the lock)."""
        self._modified[LISTING] = self.index
        waiting = self._waiting.get(LISTING)
        if waiting is not None:
            waiting[0].notify_all()

    def listing(self) -> dict[str, list[str]]:
        """Each service and its instances' tags (their union), sorted: Consul's
        ``/v1/catalog/services``, kept by each change (before: every instance sorted for each
        answer, each blocked query woken by any change: 137 ms a query at 100,000)."""
        with self._cond:
            return {service: sorted(self._tags[service]) for service in sorted(self._tags)}

    def _touch(self, service: str) -> None:
        """``service`` changed at this index (under the lock)."""
        if service in self._by_service:
            self._modified[service] = self.index
        else:
            self._modified.pop(service, None)
            self._absent = self.index
            self._absent_moved()
        waiting = self._waiting.get(service)
        if waiting is not None:
            waiting[0].notify_all()

    def _absent_moved(self) -> None:
        """The index of every service not in the catalog moved: wake those who wait on one."""
        for service, (cond, _) in self._waiting.items():
            if service not in self._modified:
                cond.notify_all()

    def _count(self, inst: Instance, delta: int) -> None:
        tags = self._tags.setdefault(inst.service, {})
        for tag in inst.tags:
            if left := tags.get(tag, 0) + delta:
                tags[tag] = left
            else:
                del tags[tag]
        for counts, counted in ((self._up, inst.state is State.UP),
                                (self._serving, inst.serving)):
            if counted:
                left = counts.get(inst.service, 0) + delta
                if left:
                    counts[inst.service] = left
                else:
                    counts.pop(inst.service, None)

    def _bump(self, changed: bool) -> bool:
        if changed:
            self.index += 1
            self._cond.notify_all()
        return changed

    def wait(self, index: int, timeout: float, service: str | None = None) -> int:
        """Block until the catalog's index (with ``service``: the index of that service's
        last change) passes ``index`` or ``timeout``; return that index."""
        with self._cond:
            if service is None:
                self._cond.wait_for(lambda: self.index > index, timeout=timeout)
                return self.index
            cond, count = self._waiting.get(service) or (threading.Condition(self._lock), 0)
            self._waiting[service] = (cond, count + 1)
            try:
                cond.wait_for(lambda: self._index_of(service) > index, timeout=timeout)
            finally:
                cond, count = self._waiting[service]
                if count > 1:
                    self._waiting[service] = (cond, count - 1)
                else:
                    del self._waiting[service]
            return self._index_of(service)

    def modified(self, service: str | None = None) -> int:
        """The index of ``service``'s last change (Consul's per-service ``X-Consul-Index``);
        None: the catalog's index."""
        with self._cond:
            return self._index_of(service)

    def _index_of(self, service: str | None) -> int:
        return self.index if service is None else self._modified.get(service, self._absent)

    def changed_since(self, index: int, known: Iterable[str]
                      ) -> tuple[int, bool, dict[str, list[Instance]]]:
        """The catalog's index, whether it is loaded, and each service that changed after
        ``index`` (an index of this catalog) with its instances, sorted by id; of the services
        ``known`` (the reader's), those gone since, with none: what a reader holding the
        catalog as of ``index`` must take again to hold it as of now (the DNS zone's build)."""
        with self._cond:
            changed = {service: list(self._by_service[service].values())
                       for service, at in self._modified.items()
                       if at > index and service != LISTING}
            if self._absent > index:
                changed.update((s, []) for s in known if s not in self._by_service)
            now, loaded = self.index, self.loaded
        for members in changed.values():  # (sorted outside the lock: a reset's are all)
            members.sort(key=_by_id)
        return now, loaded, changed

    def instances(self, service: str | None = None, *, tags: Iterable[str] = (),
                  include_draining: bool = True) -> list[Instance]:
        """Instances (sorted), optionally of one service, having all ``tags``."""
        wanted = set(tags)
        with self._cond:
            pool = (chain.from_iterable(m.values() for m in self._by_service.values())
                    if service is None else self._by_service.get(service, {}).values())
            found = [
                i for i in pool
                if wanted.issubset(i.tags) and (include_draining or i.state is State.UP)
            ]
        return sorted(found, key=lambda i: (i.service, i.id))

    def get(self, key: Key) -> Instance | None:
        with self._cond:
            return self._by_service.get(key[0], {}).get(key[1])

    def up_count(self, service: str) -> int:
        """How many instances of ``service`` are up (kept as changes come: O(1))."""
        with self._cond:
            return self._up.get(service, 0)

    def serving_count(self, service: str) -> int:
        """How many instances of ``service`` serve (up, weight above 0,
        :attr:`Instance.serving`; kept as changes come: O(1))."""
        with self._cond:
            return self._serving.get(service, 0)

    def size(self) -> int:
        with self._cond:
            return self._size

    def count(self, service: str) -> int:
        with self._cond:
            return len(self._by_service.get(service, ()))

    def services(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for inst in self.instances():
            out.setdefault(inst.service, []).append(inst)
        return out

    def serving_services(self) -> int:
        """How many services have an instance serving (O(1))."""
        with self._cond:
            return len(self._serving)
