"""The watcher: registry → catalog → (coalesced) HAProxy sync and JSON output.

Starts from one consistent snapshot, its watch's own first read, then follows the registry's
changes. Bursts coalesce in a quiescence window (``wait_min``: quiet this long; ``wait_max``:
never wait longer); reloads are rate-limited to one per ``reload_min_interval``. When the
registry is lost the catalog is kept as it was — a lost connection never empties a backend —
and the backend's watch resyncs on return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from discovery.errors import RegistryError
from discovery.metrics import Metrics
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, Watch
from discovery.registry.base import FIRST_READ
from discovery.registry.view import ServicesView
from discovery.retry import backoff
from discovery.watcher.guard import GuardSettings, WipeGuard
from discovery.watcher.json_out import JsonOut
from discovery.watcher.remember import Remember, recall, source_of
from discovery.watcher.router import Router

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_S = 1.0  # a round that raised is tried again after this long


class Watcher:
    def __init__(self, registry: Registry, router: Router | None, *,
                 json_out: Path | None = None, wait: tuple[float, float] = (0.02, 0.5),
                 reload_min_interval: float = 1.0, metrics: Metrics | None = None,
                 guard: GuardSettings | None = None, remember: Path | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.metrics.follow_registry(registry)
        self.router = router
        if router is not None:
            self.metrics.follow_outliers(router.outliers)
        self.catalog = Catalog()
        self.guard = WipeGuard(self.catalog, guard)
        self._apply_lock = threading.Lock()  # guard + catalog: one change at a time, in order
        self.config_lock = threading.Lock()  # one SIGHUP reload at a time (each its own thread)
        self.json_out = JsonOut(json_out, self.catalog) if json_out is not None else None
        # the last catalog on disk, for a restart during a wipe (none: the guard is off)
        self.remember = (Remember(remember, self.catalog, source=source_of(registry.url),
                                  current=lambda: self.registry_connected,
                                  held=self.guard.held_since)
                         if remember is not None and self.guard.settings.enabled else None)
        self._seeding = self.remember is not None  # at the first read (its age then)
        self._holding = 0  # what the guard held at the last change
        self.wait_min, self.wait_max = wait
        self.reload_min_interval = reload_min_interval
        self.registry_connected = False
        self.changes_seen = 0
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._wake = threading.Event()  # set on every change and every guard deferral
        self._first_dirty = 0.0
        self._last_change = 0.0
        self._watch: Watch | None = None
        self._ready = threading.Event()
        self._pending: list[tuple[Instance, float]] = []  # puts (and when received) to sync
        self._pending_lock = threading.Lock()
        self._changed: set[str] | None = None  # services changed since the last sync; None: all
        registry.add_state_listener(self._on_state)

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self, retry: bool = True) -> None:
        """Read the first snapshot (retrying with backoff while the registry is away)."""
        snapshot = self._first(self.registry.snapshot, retry)
        if snapshot is not None:
            self.catalog.load(snapshot)
            self._loaded()

    def _first(self, read: Callable[[], T], retry: bool = True) -> T | None:
        """``read()``, retried with backoff while the registry is away; None once stopped."""
        if not retry:
            return read()
        try:
            for attempt in backoff(RegistryError, stop_event=self._stop, logger=log,
                                   what="registry unavailable at start"):
                with attempt:
                    return read()
        except RegistryError:
            if not self._stop.is_set():
                raise
        return None

    def _recall(self) -> None:
        """Seed the catalog with the last one kept on disk (:mod:`~discovery.watcher.remember`):
        the first read comes to the wipe guard as a resync of it. At that read, not at the start:
        the file's age is its age then (a registry away for an hour at the start must not have
        its first read compared with a catalog an hour old)."""
        if self.remember is None:
            return
        view = self.registry
        found = recall(self.remember.path, self.remember.source, view.services.__contains__
                       if isinstance(view, ServicesView) else lambda s: True,
                       hold=self.guard.settings.hold)
        now, wall = time.monotonic(), time.time()  # what a predecessor held: held from then
        self.guard.preheld({k: now - (wall - min(since, wall))  # (a clock stepped back: not
                            for k, since in found.held.items()})  # ahead of now)
        seeded = self.catalog.seed(found.instances)
        if seeded:
            log.info("last catalog: %d up instances from %s; the first read is compared with "
                     "them", seeded, self.remember.path)

    def _loaded(self) -> None:
        self.registry_connected = True
        self.metrics.registry_state(True)
        log.info("catalog loaded: %d instances at revision %d", self.catalog.size(),
                 self.catalog.revision)

    def run(self) -> None:
        """Follow the registry (its first read loads the catalog: one read, ``FIRST_READ``),
        apply, until :meth:`stop`."""
        self._watch = self._first(lambda: self.registry.watch(self._on_change, FIRST_READ))
        if self._watch is None or self._stop.is_set():  # (close() stops a watch made)
            return
        self._loaded()
        self._round(self.sync)  # (a bug here too must not end run(): `watch` stops HAProxy)
        self._ready.set()
        while not self._stop.is_set():
            self._wake.wait(self._until_guard_due())
            self._wake.clear()
            self._round(self._step)
        if self.json_out is not None:  # written before a successor (SIGUSR2) writes its own
            self.json_out.flush(hurry=True)

    def _round(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # a bug, maybe met by every host at once (the same registry value):
            log.exception("watcher: applying the catalog failed; again in %g s", RETRY_S)
            self._dirty.set()  # this host's routing goes on, tried again
            self._stop.wait(RETRY_S)

    def _step(self) -> None:
        """One round of :meth:`run`: what the guard releases, the router's tick, a sync."""
        self._apply(self.guard.due)
        if self.router is not None:  # outlier ejection, retries: runtime API, when due
            self.router.tick(self.catalog)
            self.metrics.sync_router(self.router.stats)
        if self._stop.is_set() or not self._dirty.is_set():
            return
        self._quiesce()
        self._dirty.clear()
        self.sync()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._wake.set()

    def close(self) -> None:
        """Stop following the registry; what ``--json-out`` has pending is written first."""
        if self.json_out is not None:
            self.json_out.close()
        if self.remember is not None:
            self.remember.close()
        if self._watch is not None:
            self._watch.stop()
        self.registry.close(revoke=False)

    def remember_now(self) -> None:
        """Write the last catalog now (SIGUSR2: before the handover, whose successor reads it
        at its start; :meth:`close`'s write came after)."""
        if self.remember is not None:
            self.remember.close()

    def poke(self) -> None:
        """Ask for a sync soon (e.g. after SIGHUP changed the configuration)."""
        self._mark_dirty()

    # ---- events ----------------------------------------------------------------------------
    def _on_state(self, up: bool) -> None:
        self.registry_connected = up
        self.metrics.registry_state(up)
        if up:
            log.info("registry connected")
        else:
            log.warning("registry connection lost: %s", "serving the last known catalog"
                        if self.catalog.loaded else "no catalog loaded yet")

    def _on_change(self, change: Change) -> None:
        self.changes_seen += 1
        if self._seeding and change.kind == "reset":  # the first read (a watch's own)
            self._seeding = False
            self._recall()
        self._apply(lambda: self.guard.filter(change))
        self._wake.set()  # a deferral may have moved the guard's next deadline

    def _apply(self, decide: Callable[[], list[Change]]) -> None:
        """Apply what the wipe guard lets through now (``decide`` runs under the same lock,
        so a removal it releases can never overtake a put that came after it)."""
        with self._apply_lock:
            for change in decide():
                if not self.catalog.apply(change):
                    continue
                with self._pending_lock:
                    if change.kind == "reset":
                        self._changed = None  # everything may have changed
                    elif self._changed is not None:
                        self._changed.add(change.key[0])
                    if change.kind == "put" and change.instance is not None \
                            and not change.put_back:  # (no one's write: not timed)
                        self._pending.append((change.instance, time.time()))
                self._mark_dirty()
            holding = self.guard.status.holding
            self.metrics.wipe_guard(holding, self.guard.status.engaged)
            if holding != self._holding and self.remember is not None:
                # what it holds is written with its time (a hold the catalog did not change
                # for, a resync's, too); soon when it starts holding: a restart soon after must
                # know since when (else each run of a crash loop held anew)
                self.remember.changed(at_once=not self._holding)
            self._holding = holding

    def _until_guard_due(self) -> float:
        dues = [d for d in (self.guard.next_due(),
                            self.router.next_due() if self.router is not None else None)
                if d is not None]
        return min([1.0, *(max(0.0, d - time.monotonic()) for d in dues)])

    def _mark_dirty(self) -> None:
        now = time.monotonic()
        if not self._dirty.is_set():
            self._first_dirty = now
        self._last_change = now
        self._dirty.set()
        self._wake.set()

    def _quiesce(self) -> None:
        """Wait until quiet for wait_min, but never longer than wait_max since the first change;
        a reload also waits for reload_min_interval since the last one."""
        while not self._stop.is_set():
            now = time.monotonic()
            until = min(self._last_change + self.wait_min, self._first_dirty + self.wait_max)
            if self.router is not None and self.router.structure_changed():
                last = self.router.stats.last_reload
                until = max(until, time.monotonic() + (last + self.reload_min_interval
                                                       - time.time()))
            if until <= now:
                return
            self._stop.wait(until - now)

    def sync(self) -> None:
        """Apply the catalog now: HAProxy and the JSON file."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            changed, self._changed = self._changed, set()
        if self.router is not None:
            try:
                self.router.sync(self.catalog, changed)
            except BaseException:  # (run() tries again): what changed is still to apply
                with self._pending_lock:
                    if changed is None or self._changed is None:
                        self._changed = None  # (all)
                    else:
                        self._changed |= changed
                    self._pending[:0] = pending
                raise
            self.metrics.sync_router(self.router.stats)
        applied = time.time()
        for instance, received in pending:  # seen → written → received → applied: histograms
            self.metrics.propagated(instance, applied, received)
        if self.json_out is not None:
            self.json_out.sync(changed)
        if self.remember is not None:
            self.remember.changed()

    @property
    def json_error(self) -> str | None:
        """Why the last ``--json-out`` write failed (None: it did not)."""
        return self.json_out.error if self.json_out is not None else None
