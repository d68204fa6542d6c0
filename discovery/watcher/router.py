"""Keeps one HAProxy in step with the catalog.

Membership (an instance added, removed, draining, re-weighted) goes through the runtime API
onto pre-allocated slots: no reload. Structure (listeners, options, slot counts, template)
goes through confd's pipeline: render → stage next to the destination → ``haproxy -c`` →
skip when identical → atomic replace (in-place write where rename fails) → seamless reload
through the master socket → re-apply every slot. A config that fails is never installed:
the last good one keeps serving, and membership keeps flowing through the runtime API."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from discovery.errors import HAProxyError, RenderError, ValidationError
from discovery.files import install, stage
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.retry import RetryAt
from discovery.watcher.config import WatcherConfig
from discovery.watcher.outlier import OutlierDetector, OutlierSettings
from discovery.watcher.render import Renderer, RuntimePaths, build_context
from discovery.watcher.slots import MAX_SLOTS, Slot, SlotTable, slot_count
from discovery.watcher.stat_reads import Busy, CheckedDown
from discovery.watcher.supervisor import (
    HAProxyControl,
    HAProxySupervisor,
    validate_config,
)
from discovery.watcher.zones import steer

log = logging.getLogger(__name__)
#: a backend with over SHRINK times the slots it needs for SHRINK_AFTER s shrinks at the next
#: reload, to what its most instances since need (at once: bursts in turn cost reloads)
SHRINK, SHRINK_AFTER = 4, 600.0
Outcome = Literal["none", "runtime", "reload", "failed"]


@dataclass
class RouterStats:
    reloads: int = 0
    runtime_ops: int = 0
    render_errors: int = 0
    haproxy_errors: int = 0
    last_reload: float = 0.0
    last_error: str = ""
    history: list[str] = field(default_factory=list)  # outcomes, newest last (bounded)
    #: (unix time, "reload" | "error", error text): the status page's recent reloads and errors
    events: list[tuple[float, str, str]] = field(default_factory=list)
    _seen: tuple[int, int] = (0, 0)  # reloads and errors when events were last noted

    def note(self, outcome: Outcome) -> None:
        self.history = [*self.history[-99:], outcome]
        errors = self.render_errors + self.haproxy_errors
        new = [(time.time(), kind, text) for kind, text, more in (
            ("reload", "", self.reloads > self._seen[0]),
            ("error", self.last_error, errors > self._seen[1])) if more]
        if new:
            self.events = [*self.events, *new][-20:]
        self._seen = (self.reloads, errors)


class Router:
    def __init__(self, config: WatcherConfig, config_path: Path, paths: RuntimePaths,
                 control: HAProxyControl | None, *, haproxy_bin: str = "haproxy",
                 renderer: Renderer | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.paths = paths
        self.control = control
        self.haproxy_bin = haproxy_bin
        self.renderer = renderer or Renderer(config.template)
        self.tables: dict[str, SlotTable] = {}
        self.stats = RouterStats()
        self._lock = threading.RLock()
        self._running_config: WatcherConfig | None = None  # what the installed file was made of
        self._last_attempt: tuple[WatcherConfig, dict[str, int]] | None = None
        self._unloaded = False  # a file was installed that HAProxy did not load (reload failed)
        # (service, slot) the runtime API failed to set: sent again when _retry is due
        self._unapplied: set[tuple[str, str]] = set()
        self._retry = RetryAt()
        # a start or reload HAProxy failed (its process, not the config): tried again when due
        self._again = RetryAt()
        self._placing = 0.0  # when a reload may place instances no free slot took (monotonic)
        self._capped: dict[str, int] = {}  # service -> instances past MAX_SLOTS, last said
        self._oversized: dict[str, tuple[float, int]] = {}  # SHRINK: since when, most since
        self.outliers = OutlierDetector()
        self.checks = CheckedDown()  # local instances HAProxy's checks hold down (zones)

    # ---- what the catalog asks for ---------------------------------------------------------
    def desired(self, catalog: Catalog, only: set[str] | None = None
                ) -> dict[str, dict[str, Instance]]:
        """Routed instances per configured service (only those in ``only``, when given)."""
        out: dict[str, dict[str, Instance]] = {}
        for name, svc in self.config.services.items():
            if only is None or name in only:  # zones; ejections drain; down: not local up
                mine = {i.id: i for i in catalog.instances(name) if svc.accepts(i)}
                down = self.checks.down.get(name, set()) | self.outliers.held_back(name)
                out[name] = steer(mine, self.config.zone, svc.zone_min_up,
                                  self.outliers.ejected(name), down)
        return out

    def structure_changed(self) -> bool:
        """The configuration differs from what HAProxy runs (cheap: no catalog scan)."""
        return self._running_config != self.config or set(self.tables) != set(self.config.services)

    def needs_reload(self, desired: dict[str, dict[str, Instance]]) -> bool:
        if self.structure_changed():
            return True
        return any(len(insts) > self.tables[name].size < MAX_SLOTS
                   for name, insts in desired.items())

    def set_config(self, config: WatcherConfig, renderer: Renderer | None = None) -> None:
        """A new configuration (SIGHUP); applied by the next :meth:`sync`."""
        with self._lock:
            self.config = config
            if renderer is not None:  # the template file may have changed: render it again
                self.renderer = renderer
                self._running_config = None
                self._last_attempt = None

    # ---- the one entry point ---------------------------------------------------------------
    def sync(self, catalog: Catalog, only: set[str] | None = None) -> Outcome:
        """Bring HAProxy in line with the catalog. ``only``: the services that changed since the
        last sync (None: all) — a change then costs the same whatever the catalog's size."""
        with self._lock:
            if getattr(self.control, "handed_over", None) is not None:
                return "none"  # another watcher drives this HAProxy now (watcher/adopt.py)
            if only is not None and self.structure_changed():
                only = None
            desired = self.desired(catalog, only)
            self._note_sizes(desired)
            outcome: Outcome = "none"
            if self.needs_reload(desired):
                if only is not None:
                    desired = self.desired(catalog)
                sizes = self._sizes(desired)
                if not self.structure_changed() and self._interval_left() > 0:
                    # slots outgrown: one reload an interval (tick), what fits placed meanwhile
                    self._placing = self._placing or time.monotonic() + self._interval_left()
                elif self._last_attempt == (self.config, sizes):
                    outcome = "failed"  # same inputs failed before: don't hammer; runtime only
                else:
                    outcome = self._reload(desired, sizes)
            if outcome != "reload":
                busy = Busy(self.control)
                changes = {name: list(self.tables[name].assign(insts, busy.of(name)).values())
                           for name, insts in desired.items() if name in self.tables}
                if any(changes.values()) or self._unapplied:
                    self._apply({k: v for k, v in changes.items() if v})
                    outcome = "runtime" if outcome == "none" else outcome
                self._past_most(changes, desired)
                waiting = [n for n in changes if self.tables[n].overflow
                           and len(desired[n]) <= self.tables[n].size]
                wait = self._interval_left()
                if waiting and outcome != "failed" and wait > 0:
                    self._placing = time.monotonic() + wait  # one reload an interval: tick
                elif waiting and outcome != "failed":
                    # no usable slot (every free one still has sessions): a reload places them,
                    # its new worker's slots having none (once for the same inputs, as above)
                    full = desired if only is None else self.desired(catalog)
                    sizes = self._sizes(full)
                    if self._last_attempt != (self.config, sizes):
                        log.info("no free slot without sessions in %s: placed with a reload",
                                 ", ".join(waiting))
                        outcome = self._reload(full, sizes)
            self.stats.note(outcome)
            return outcome

    def _interval_left(self) -> float:
        """Seconds until ``reload_min_interval`` has passed since the last reload."""
        return min(self.stats.last_reload + self.config.reload_min_interval - time.time(),
                   self.config.reload_min_interval)  # (a clock stepped back)

    def _reload(self, desired: dict[str, dict[str, Instance]], sizes: dict[str, int]
                ) -> Outcome:
        try:
            self._restructure(desired, sizes)
            return "reload"
        except (RenderError, ValidationError, HAProxyError, OSError) as exc:
            self._failed(exc, sizes)  # OSError: the state dir (disk full, read-only)
            return "failed"

    def _past_most(self, changes: dict[str, list[Slot]],
                   desired: dict[str, dict[str, Instance]]) -> None:
        """Say (once a count) which services have more instances than a backend's most slots:
        those past it are not routed (a runaway writer must not stop every host's reloads)."""
        for name in changes:
            table = self.tables[name]
            over = max(0, len(desired[name]) - table.size) if table.size >= MAX_SLOTS else 0
            if over and self._capped.get(name) != over:
                log.error("%s has %d instances, more than the %d slots a backend may have: %d "
                          "of them not routed", name, len(desired[name]), MAX_SLOTS, over)
            self._capped[name] = over

    def _sizes(self, desired: dict[str, dict[str, Instance]]) -> dict[str, int]:
        sizes, now = {}, time.monotonic()
        for name, insts in desired.items():
            svc = self.config.services[name]
            old = self.tables[name].size if name in self.tables else 0
            since, most = self._oversized.get(name, (now, 0))
            shrink = now - since >= SHRINK_AFTER  # too big for long: sized for its most since
            need = slot_count(max(most, len(insts)) if shrink else len(insts), svc.slots or 8)
            keep = not shrink and old > 0 and old >= max(len(insts), svc.slots or 0)
            sizes[name] = old if keep else need
        return sizes

    def _note_sizes(self, desired: dict[str, dict[str, Instance]]) -> None:
        """Backends with over SHRINK times the slots they need: since when, most instances since."""
        now = time.monotonic()
        for name, insts in desired.items():
            table, svc = self.tables.get(name), self.config.services[name]
            if table is None or table.size <= SHRINK * slot_count(len(insts), svc.slots or 8):
                self._oversized.pop(name, None)
            else:
                since, most = self._oversized.get(name, (now, 0))
                self._oversized[name] = (since, max(most, len(insts)))

    def _failed(self, exc: Exception, sizes: dict[str, int]) -> None:
        self._last_attempt = (self.config, sizes)  # the same inputs are not tried again...
        self.stats.last_error = str(exc)
        if not isinstance(exc, HAProxyError | OSError):
            self.stats.render_errors += 1
            log.error("config not applied, the last good one keeps serving: %s", exc)
            return
        # ...unless HAProxy itself failed (a listener's port still taken, its master socket
        # not answering) or the system did (a full disk, no process to be had): that may pass,
        # so the same start or reload is tried again later
        self.stats.haproxy_errors += 1
        wait = self._again.failed()
        if isinstance(self.control, HAProxySupervisor) and not self.control.running:
            log.error("HAProxy not started: %s; tried again in %.0f s", exc, wait)
        else:
            log.error("config not applied, the last good one keeps serving: %s; tried again "
                      "in %.0f s", exc, wait)

    def _restructure(self, desired: dict[str, dict[str, Instance]], sizes: dict[str, int]) -> None:
        tables = {}
        for name, insts in desired.items():
            old = self.tables.get(name) or SlotTable(0)
            tables[name] = old.resized(sizes[name], insts)  # instances keep their slots
        text = self.render({name: t.slots() for name, t in tables.items()})
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        control = self.control
        # a new HAProxy checks the config itself as it starts (HAProxySupervisor.start)
        fresh = isinstance(control, HAProxySupervisor) and control.nothing_here()
        staged = stage(text, self.config_path)
        try:
            if not fresh:
                validate_config(self.haproxy_bin, staged)
            changed = install(staged, self.config_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        previous, self.tables = self.tables, tables
        if isinstance(control, HAProxySupervisor) and not control.running:
            try:
                control.start(validated=not fresh)
            except (RenderError, HAProxyError, OSError):  # refused the config (as haproxy -c
                self.tables = previous  # does), did not start, or was adopted but its catch-up
                self._unloaded = control.running  # reload failed: reloaded at the next try
                raise
            log.info("HAProxy started with %s", self.config_path)
            self._unapplied.clear()  # the file carries every slot
        elif control is not None and (changed or self._unloaded):
            self._unloaded = True  # until a reload succeeds, even if the next file is the same
            try:
                control.reload()
            except HAProxyError:
                self.tables = previous  # HAProxy still runs the config it had
                raise
            self._unloaded = False
            self._unapplied.clear()  # the file carries every slot
            self.stats.reloads += 1
            self.stats.last_reload = time.time()
            log.info("HAProxy reloaded (%d services)", len(tables))
        self._running_config = self.config
        self._last_attempt = None
        self._again.succeeded()
        # No re-apply: the file just installed carries every slot as the tables hold it (runtime
        # state is lost on reload, but nothing is missing from the file). A crash restart, whose
        # file may be older than the runtime state, re-applies (supervisor on_restart).

    def render(self, slots: dict[str, list[Slot]]) -> str:
        return self.renderer.render(build_context(self.config, slots, self.paths))

    def render_current(self, catalog: Catalog) -> str:
        """The config for the catalog as it is (``--once --dry-run``), touching nothing."""
        desired = self.desired(catalog)
        sizes = self._sizes(desired)  # once, not once per service
        return self.render({name: SlotTable(0).resized(sizes[name], insts).slots()
                            for name, insts in desired.items()})

    # ---- runtime API -----------------------------------------------------------------------
    def _apply(self, changes: dict[str, list[Slot]]) -> None:
        """Send ``changes``, and the slots an earlier call failed to set (as the tables hold
        them now); what fails is sent again later (:meth:`tick`)."""
        if self.control is None:
            return
        if self._again.due and isinstance(self.control, HAProxySupervisor) \
                and not self.control.running:
            self._unapplied.clear()  # no HAProxy to tell: the start tried again writes every
            return  # slot in its file (and nothing is left due for tick: no busy loop)
        merged = {name: {s.name: s for s in slots} for name, slots in changes.items()}
        for name, slot_name in self._unapplied:
            table = self.tables.get(name)
            slot = table.slot(slot_name) if table is not None else None
            if slot is not None:
                merged.setdefault(name, {}).setdefault(slot_name, slot)
        todo = {name: list(slots.values()) for name, slots in merged.items() if slots}
        if not todo:
            self._unapplied.clear()
            return
        try:
            self.control.runtime.apply_slots(todo)
            self.stats.runtime_ops += sum(len(v) for v in todo.values())
            log.debug("runtime: %s", {k: [s.name for s in v] for k, v in todo.items()})
            self._unapplied.clear()
            self._retry.succeeded()
        except HAProxyError as exc:
            self.stats.haproxy_errors += 1
            self.stats.last_error = str(exc)
            self._unapplied = {(name, s.name) for name, slots in todo.items() for s in slots}
            wait = self._retry.failed()
            log.error("runtime API: %s; %d slot(s) sent again in %.0f s", exc,
                      len(self._unapplied), wait)

    # ---- outlier ejection (the watcher loop calls these) ------------------------------------
    def _outlier_settings(self) -> dict[str, OutlierSettings]:
        zone = self.config.zone  # (with no check: on by default, ServiceConfig.outlier_in)
        return {n: o for n, s in self.config.services.items() if (o := s.outlier_in(zone))}

    def _checked_zones(self) -> list[str]:
        """The services routed by zone whose checks tell the local zone's up (CheckedDown)."""
        return [n for n, s in self.config.services.items() if self.config.zone and s.check]

    def next_due(self) -> float | None:
        """When :meth:`tick` has work (monotonic time); None: none."""
        dues = [self.outliers.due(self._outlier_settings()),
                self.checks.due(self._checked_zones()),
                self._retry.due if self._unapplied else None, self._again.due or None,
                self._placing or None]
        return min((d for d in dues if d is not None), default=None)

    def tick(self, catalog: Catalog) -> None:
        """Try a start or reload HAProxy failed again, and send again what the runtime API
        failed to set, when due; read HAProxy's counters when due, eject and re-admit."""
        with self._lock:
            if self._again.taken():
                self._last_attempt = None
                self.sync(catalog)  # the failed start or reload, once more
            if self._placing and time.monotonic() >= self._placing:
                self._placing = 0.0
                self.sync(catalog)  # what no free slot took, placed with a reload now
            if self._unapplied and self._retry.taken():
                self._apply({})
            settings, zoned = self._outlier_settings(), self._checked_zones()
            due = min((d for d in (self.outliers.due(settings), self.checks.due(zoned))
                       if d is not None), default=None)
            if due is None or time.monotonic() < due or self.control is None:
                return
            stat, now = None, time.monotonic()
            counters = bool(settings) and now >= self.outliers.next_read
            checks = bool(zoned) and now >= self.checks.next_read
            if counters or checks:
                try:
                    stat = self.control.runtime.stat()
                except HAProxyError as exc:  # not before the next interval: no busy loop
                    log.debug("show stat: %s", exc)
                    if counters:
                        self.outliers.next_read = now + min(c.interval for c in settings.values())
                    if checks:
                        self.checks.failed()
            took = time.monotonic() - now  # (show stat's: what the checks' next read waits on)
            names = [n for n in {*settings, *zoned} if n in self.tables]
            slots = {n: self.tables[n].ids() for n in names}
            up = {n: {i.id for i in catalog.instances(n) if i.state is State.UP
                      and self.config.services[n].accepts(i)} for n in settings if n in slots}
            changed = self.outliers.observe(settings, stat if counters else None, slots, up,
                                            took)  # (none asking: what is left ends)
            if stat is not None and zoned:
                changed |= self.checks.observe(zoned, stat, slots, took)
            if not changed:
                return
            desired = self.desired(catalog, changed)
            busy = Busy(self.control)  # a change not synced yet may place an instance too
            changes = {name: list(self.tables[name].assign(insts, busy.of(name)).values())
                       for name, insts in desired.items() if name in self.tables}
            self._apply({k: v for k, v in changes.items() if v})

    def reapply(self) -> None:
        """Put every slot into HAProxy again: after a reload or a restart runtime state is gone."""
        with self._lock:
            self._apply({name: table.slots() for name, table in self.tables.items()})

