"""The wipe guard: a registry-side wipe never blacks out a service on every host at once.

The registry is shared by the whole fleet, so one event there — every lease revoked by a
stuck etcd leader (etcd #15247), the prefix deleted, an empty backup restored — would empty
every backend on every host at the same moment. The two known answers each have a flaw:
Synapse's ``use_previous_backends`` never lets a service go empty, so stopping the last
instance keeps traffic on it; Envoy's panic threshold routes to every host once too few are
healthy, dead ones included. Our rule:

1. A *wipe* is at least ``min_removed`` (3) instances and at least ``fraction`` (50 %) of the
   catalog removed within ``window`` seconds (2 s), by deletes or by a resync snapshot, while
   ``up``. An agent drains what it deregisters (``draining`` first, then the delete), so a
   departure, such as a rolling deploy of a small service, never counts, and is never held
   (on ZooKeeper, whose events carry no data, a delete read right after a change of the same
   node is taken as that: :attr:`~discovery.registry.base.Change.drained`).
2. Outside a wipe, a removal that leaves its service another up instance is applied at once
   (a rolling deploy, a scale-down: the guard costs nothing there). One that would leave the
   service with no up instance *settles* for ``settle`` seconds (0.2 s; the instance keeps
   serving meanwhile), then is applied unless a wipe began meanwhile. So a host that dies
   takes its instances away after its TTL, and a bare delete of a service's last instance
   stops traffic to it 0.2 s later (an agent's, drained first, at once).
3. During a wipe every removal is *held*: the instance stays in the catalog (HAProxy, DNS and
   HTTP go on serving it) until it is registered again (the agents re-register after losing
   their lease or session), or the wipe is over (no mass removal for ``window`` seconds) and
   its service has an up instance again, or ``hold`` seconds (30 s) passed.
4. The price: when half the catalog really dies at once (a zone lost), its instances keep a
   share of traffic until the removals stop plus ``window`` seconds, or up to ``hold`` for a
   service with nothing else up, which had nothing else to route to anyway. HAProxy's
   ``retries`` and ``option redispatch`` send a refused request to another server meanwhile.

The guard is a pure state machine driven by the watcher (one lock, no threads of its own):
:meth:`WipeGuard.filter` takes each registry change and returns what to apply now;
:meth:`WipeGuard.due` returns the removals whose time has come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from discovery.errors import ConfigError, ValidationError
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.model.durations import parse_duration
from discovery.registry import Change
from discovery.registry.base import Snapshot

log = logging.getLogger(__name__)
Key = tuple[str, str]


@dataclass(frozen=True)
class GuardSettings:
    """``[watcher] wipe_guard = { settle = "200ms", window = "2s", fraction = 0.5,
    min_removed = 3, hold = "30s" }``, or ``wipe_guard = false`` to turn it off."""

    settle: float = 0.2
    window: float = 2.0
    fraction: float = 0.5
    min_removed: int = 3
    hold: float = 30.0
    enabled: bool = True

    @classmethod
    def parse(cls, value: object, culprit: str = "watcher.wipe_guard") -> GuardSettings:
        """From TOML: a table of the keys above, or a boolean. One :class:`ConfigError`
        naming the key otherwise."""
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{culprit}: must be a table or true/false")
        unknown = sorted(set(value) - {"settle", "window", "fraction", "min_removed", "hold"})
        if unknown:
            raise ConfigError(f"{culprit}.{unknown[0]}: unknown key (allowed: fraction, hold, "
                              "min_removed, settle, window)")
        out: dict[str, Any] = {}
        try:
            for key, most in (("settle", 10.0), ("window", 60.0), ("hold", 3600.0)):
                if key in value:
                    out[key] = parse_duration(f"{culprit}.{key}", value[key], maximum=most)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        fraction = value.get("fraction", cls.fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
                or not 0 < fraction <= 1:
            raise ConfigError(f"{culprit}.fraction: must be a number in (0, 1]")
        least = value.get("min_removed", cls.min_removed)
        if isinstance(least, bool) or not isinstance(least, int) or not 1 <= least <= 10**6:
            raise ConfigError(f"{culprit}.min_removed: must be a whole number >= 1")
        return cls(fraction=float(fraction), min_removed=least, **out)


@dataclass
class _Deferred:
    instance: Instance
    due: float
    held_since: float | None = None


@dataclass
class GuardStatus:
    """What /v1/health and /metrics show."""

    holding: int = 0
    settling: int = 0
    engaged: int = 0  # times a wipe was detected
    held_total: int = 0  # instances ever held
    last_engaged: float | None = None  # unix time
    services: list[str] = field(default_factory=list)


class WipeGuard:
    def __init__(self, catalog: Catalog, settings: GuardSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.settings = settings or GuardSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._deferred: dict[Key, _Deferred] = {}
        self._by_service: dict[str, set[str]] = {}  # service -> deferred instance ids
        self._removals: deque[tuple[float, int]] = deque()  # (time, catalog size before)
        self._wiped_until = 0.0
        self.status = GuardStatus()

    # ---- input ----------------------------------------------------------------------------
    def filter(self, change: Change) -> list[Change]:
        """The changes to apply to the catalog now, in order, for one registry change."""
        if not self.settings.enabled:
            return [change]
        with self._lock:
            now = self._clock()
            if change.kind == "reset":
                return [self._reset(change, now)]
            if change.kind == "put" and change.instance is not None:
                return self._put(change, now)
            return self._delete(change, now)

    def due(self) -> list[Change]:
        """Removals that settled (not a wipe) or whose hold ran out: apply them now."""
        out: list[Change] = []
        with self._lock:
            now = self._clock()
            wiped = self._wiped(now)
            for key, entry in list(self._deferred.items()):
                if entry.held_since is None:
                    if entry.due > now:
                        continue
                    if wiped:
                        entry.held_since, entry.due = now, now + self.settings.hold
                        self.status.held_total += 1
                        log.warning("wipe guard: holding %s/%s (removed during a registry "
                                    "wipe)", *key)
                        continue
                elif entry.due <= now:
                    log.warning("wipe guard: %s/%s not back after %.0fs: removed", *key,
                                self.settings.hold)
                elif wiped or not self._has_up(key[0], key):
                    continue  # still wiping, or its service has nothing else up: keep it
                out.append(self._release(key))
            self._count()
        return out

    def next_due(self) -> float | None:
        """Monotonic time of the next :meth:`due` work, or None."""
        with self._lock:
            return min((e.due for e in self._deferred.values()), default=None)

    def wiping(self) -> bool:
        """True while removals within the window amount to a wipe."""
        with self._lock:
            return self._wiped(self._clock())

    def held(self) -> list[Key]:
        with self._lock:
            return sorted(k for k, e in self._deferred.items() if e.held_since is not None)

    # ---- the rules --------------------------------------------------------------------------
    def _put(self, change: Change, now: float) -> list[Change]:
        assert change.instance is not None
        self._pop(change.key)  # back (or re-registered): nothing to remove
        self._count()
        return [change]

    def _delete(self, change: Change, now: float) -> list[Change]:
        current = self._current(change.key)
        if current is None:
            return [change]
        if change.drained or current.state is not State.UP:  # drained first: a departure
            self._pop(change.key)
            return [change]
        self._note_removals(now, 1)
        keep = self._wiped(now) or not self._has_up(change.key[0], change.key)
        if not keep:
            self._pop(change.key)
            return [change]
        if change.key not in self._deferred:
            self._defer(change.key, _Deferred(current, now + self.settings.settle))
        self._count()
        return []  # stays in the catalog until due() decides

    def _reset(self, change: Change, now: float) -> Change:
        snapshot = change.snapshot or Snapshot()
        before = {i.key: i for i in self.catalog.instances()}
        withheld = snapshot.withheld  # not read (denied): the catalog keeps them as they are
        gone = [k for k in before if k not in snapshot.instances and k[0] not in withheld]
        up_gone = sum(1 for k in gone if before[k].state is State.UP)
        if up_gone:
            self._note_removals(now, up_gone)
        keep = dict(snapshot.instances)
        up_after = {i.service for i in keep.values() if i.state is State.UP}
        wiped = self._wiped(now)
        for key in gone:
            inst = before[key]
            if inst.state is State.UP and (wiped or key[0] not in up_after):
                keep[key] = inst
                if key not in self._deferred:
                    self._defer(key, _Deferred(inst, now + self.settings.settle))
        # back in the registry, or gone from the catalog the reset makes: nothing to hold
        for key in [k for k in self._deferred
                    if k in snapshot.instances or (k not in keep and k[0] not in withheld)]:
            self._pop(key)
        self._count()
        if len(keep) == len(snapshot.instances):
            return change
        return replace(change, snapshot=replace(snapshot, instances=keep))

    # ---- helpers ---------------------------------------------------------------------------
    def _note_removals(self, now: float, count: int) -> None:
        size = self.catalog.size()
        for _ in range(count):
            self._removals.append((now, size))
        if self._wiped(now) and self._wiped_until < now:
            self.status.engaged += 1
            self.status.last_engaged = time.time()
            log.warning("wipe guard engaged: %d instances removed from the registry within "
                        "%.1fs (%d in the catalog): removals are held until re-registered, "
                        "at most %.0fs",
                        len(self._removals), self.settings.window, self._removals[0][1],
                        self.settings.hold)
        if self._wiped(now):
            self._wiped_until = now + self.settings.window

    def _wiped(self, now: float) -> bool:
        while self._removals and self._removals[0][0] < now - self.settings.window:
            self._removals.popleft()
        if len(self._removals) < self.settings.min_removed:
            return False
        return len(self._removals) >= self.settings.fraction * max(self._removals[0][1], 1)

    def _current(self, key: Key) -> Instance | None:
        return self.catalog.get(key)

    def _has_up(self, service: str, besides: Key) -> bool:
        """An up instance of ``service`` other than ``besides`` and the deferred ones (all of
        which are up: only up instances are deferred)."""
        deferred = self._by_service.get(service, ())
        other = self.catalog.get(besides)
        mine = other is not None and other.state is State.UP and besides[1] not in deferred
        return self.catalog.up_count(service) - len(deferred) - mine > 0

    def _defer(self, key: Key, entry: _Deferred) -> None:
        self._deferred[key] = entry
        self._by_service.setdefault(key[0], set()).add(key[1])

    def _pop(self, key: Key) -> _Deferred | None:
        entry = self._deferred.pop(key, None)
        ids = self._by_service.get(key[0])
        if ids is not None:
            ids.discard(key[1])
            if not ids:
                del self._by_service[key[0]]
        return entry

    def _release(self, key: Key) -> Change:
        entry = self._pop(key)
        assert entry is not None
        if entry.held_since is not None:
            log.info("wipe guard: released %s/%s after %.1fs", *key,
                     self._clock() - entry.held_since)
        return Change("delete", key=key, revision=self.catalog.revision)

    def _count(self) -> None:
        held = [k for k, e in self._deferred.items() if e.held_since is not None]
        self.status.holding = len(held)
        self.status.settling = len(self._deferred) - len(held)
        self.status.services = sorted({k[0] for k in held})
