"""Outlier ejection: instances that pass their checks but fail requests are taken out.

The watcher reads HAProxy's own per-server counters (``show stat``: ``hrsp_5xx``, ``eresp``,
``econ`` against the other responses) every ``interval``. Errors seen in reads without a single
success add up to a run; a read with a success ends the run (a read with more errors than
successes counts as a run of its errors: the rate equivalent). A run of ``consecutive_errors``
ejects the instance: its slot goes to ``drain`` through the runtime API (in-flight requests
finish, no new ones arrive). It comes back after ``base_ejection`` times the number of its
ejections; that number is forgotten once it has stayed clean as long as its last ejection
lasted. At most ``max_ejected`` of a service's up instances are out at once (``"50%"``, rounded
down, or a count); an instance over the cap stays in and is ejected when there is room.

HAProxy's own ``observe layer7`` + ``on-error mark-down`` is not used: its health check brings the
server straight back (no backoff) and nothing caps how many go.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from discovery.model.durations import parse_duration
from discovery.watcher.options import config_errors, fail, key_name, show
from discovery.watcher.stat_reads import COST

log = logging.getLogger(__name__)

ERROR_FIELDS = ("hrsp_5xx", "eresp", "econ")
OK_FIELDS = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx")
KEYS = ("consecutive_errors", "interval", "base_ejection", "max_ejected")
_PERCENT = re.compile(r"([0-9]{1,3})%")


@dataclass(frozen=True)
class OutlierSettings:
    """``[services.NAME] outlier = { ... }``; every key optional."""

    consecutive_errors: int = 5
    interval: float = 1.0  # seconds between two reads of the counters
    base_ejection: float = 10.0  # seconds; times the number of ejections
    max_ejected: int = 50
    max_ejected_percent: bool = True  # max_ejected is a percentage (else a count)

    @classmethod
    def parse(cls, culprit: str, value: object) -> OutlierSettings:
        """A TOML table -> settings; one ConfigError naming ``culprit.<key>`` otherwise."""
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            fail(culprit, "must be a table, e.g. { consecutive_errors = 5 }, or true")
        unknown = sorted(map(key_name, set(value) - set(KEYS)))
        if unknown:
            fail(f"{culprit}.{unknown[0]}", f"unknown key (allowed: {', '.join(KEYS)})")
        out: dict[str, Any] = {}
        if "consecutive_errors" in value:
            raw = value["consecutive_errors"]
            if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 100000:
                fail(f"{culprit}.consecutive_errors", f"{show(raw)} is not a whole number in "
                     "1..100000")
            out["consecutive_errors"] = raw
        for key, low, high in (("interval", 0.05, 3600.0), ("base_ejection", 0.05, 86400.0)):
            if key in value:
                with config_errors():
                    out[key] = parse_duration(f"{culprit}.{key}", value[key], minimum=low,
                                              maximum=high)
        if "max_ejected" in value:
            out["max_ejected"], out["max_ejected_percent"] = _cap(f"{culprit}.max_ejected",
                                                                  value["max_ejected"])
        return cls(**out)

    def cap(self, up: int) -> int:
        """How many of ``up`` instances may be ejected at once."""
        if self.max_ejected_percent:
            return math.floor(up * self.max_ejected / 100 + 1e-9)
        return min(up, self.max_ejected)

    def describe(self) -> str:
        cap = f"{self.max_ejected}%" if self.max_ejected_percent else str(self.max_ejected)
        return (f"consecutive_errors {self.consecutive_errors}, interval {self.interval:g}s, "
                f"base_ejection {self.base_ejection:g}s, max_ejected {cap}")


def _cap(culprit: str, raw: object) -> tuple[int, bool]:
    if isinstance(raw, str):
        m = _PERCENT.fullmatch(raw.strip())
        if m is None or not 0 <= int(m[1]) <= 100:
            fail(culprit, f'{show(raw)} is not a percentage like "50%" (0..100) or a count')
        return int(m[1]), True
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 100000:
        fail(culprit, f'{show(raw)} is not a percentage like "50%" or a count in 0..100000')
    return raw, False


def _counter(row: Mapping[str, str], names: Iterable[str]) -> int:
    total = 0
    for name in names:
        value = row.get(name, "")
        total += int(value) if value.isdigit() else 0
    return total


@dataclass
class _Tracked:
    """One instance as the detector follows it."""

    errors: int = -1  # cumulative counters at the last read (-1: no read yet)
    ok: int = 0
    run: int = 0  # errors in a row
    ejections: int = 0
    until: float = 0.0  # ejected until (monotonic); 0: in
    back_at: float = 0.0
    last_duration: float = 0.0
    reason: str = ""
    held: bool = False  # over the threshold, kept in by the cap


@dataclass
class Ejection:
    service: str
    instance_id: str
    reason: str
    ejections: int
    remaining: float


@dataclass
class OutlierStats:
    ejections: dict[str, int] = field(default_factory=dict)  # per service, total
    held: dict[str, int] = field(default_factory=dict)  # per service, now: kept in by the cap


class OutlierDetector:
    """Follows HAProxy's counters; decides who is ejected. No I/O of its own: the router reads
    ``show stat`` when :meth:`due` and applies what :meth:`observe` says changed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: service -> instance id -> what is followed of it: what one service asks costs its
        #: instances, not every service's (1,000 services routed by zone: a read of the counters
        #: was 257 ms when one dict by (service, id) was scanned for each)
        self._by_service: dict[str, dict[str, _Tracked]] = {}
        # instances that left the up set with ejections on record (a check that flaps, a
        # re-registration): back in it, they are still out and keep their count, until forgiven
        self._gone: dict[tuple[str, str], _Tracked] = {}
        self.next_read = 0.0
        self.stats = OutlierStats()

    def due(self, settings: Mapping[str, OutlierSettings]) -> float | None:
        """When the counters should be read next (monotonic); None: no service asks. None
        asking but ejections left (a SIGHUP took the setting, or the zone that set it): at
        once, so :meth:`observe` ends them (before, they stayed drained for good)."""
        ends = [t.until for mine in self._by_service.values() for t in mine.values() if t.until]
        if not settings:
            return 0.0 if ends else None
        return min([self.next_read, *ends])

    def ejected(self, service: str) -> set[str]:
        return {iid for iid, t in self._by_service.get(service, {}).items() if t.until}

    def held_back(self, service: str) -> set[str]:
        """Its instances failing enough to go but kept in by ``max_ejected``: not the local
        zone's up (zones.steer), so two bad local instances of three do not hold the zone."""
        return {iid for iid, t in self._by_service.get(service, {}).items() if t.held}

    def _items(self) -> list[tuple[tuple[str, str], _Tracked]]:
        """Every instance followed, a copy (a scrape's thread reads it too)."""
        return [((svc, iid), t) for svc, mine in list(self._by_service.items())
                for iid, t in list(mine.items())]

    def _track(self, key: tuple[str, str], t: _Tracked) -> _Tracked:
        self._by_service.setdefault(key[0], {})[key[1]] = t
        return t

    def _untrack(self, key: tuple[str, str]) -> _Tracked:
        mine = self._by_service[key[0]]
        t = mine.pop(key[1])
        if not mine:
            del self._by_service[key[0]]
        return t

    def observe(self, settings: Mapping[str, OutlierSettings],
                stat: Mapping[tuple[str, str], Mapping[str, str]] | None,
                slots: Mapping[str, Mapping[str, str]],
                up: Mapping[str, set[str]], took: float = 0.0) -> set[str]:
        """One step. ``stat``: ``show stat`` rows by (backend, server), or None when only
        ejections are due to end; ``slots``: per service, slot name -> instance id; ``up``: per
        service, the ids of its up instances; ``took``: how long that read took (the next one
        waits at least ``COST`` times that, as ``CheckedDown``'s: a read of every backend is
        ~0.5 s at 1,000 services, under the router's lock). Returns the services whose
        ejections changed."""
        now = self._clock()
        changed: set[str] = set()
        left = [(svc, iid) for svc, mine in self._by_service.items()  # (no tuple per instance)
                for iid in (mine.keys() - up.get(svc, set()) if svc in settings else mine)]
        for key in left:
            t = self._untrack(key)
            if t.until:
                changed.add(key[0])
            if t.ejections:
                t.errors, t.run, t.held = -1, 0, False  # its counters start again on return
                self._gone[key] = t
        for key in [k for k in self._gone if k[0] in settings and k[1] in up.get(k[0], ())]:
            t = self._track(key, self._gone.pop(key))
            if t.until:
                changed.add(key[0])  # back in the up set, still ejected
        self._gone = {k: t for k, t in self._gone.items()
                      if now < max(t.until, t.back_at) + t.last_duration}  # else forgiven
        for svc, mine in self._by_service.items():
            for iid, t in mine.items():
                if t.until and t.until <= now:
                    self._readmit((svc, iid), t, now)
                    changed.add(svc)
        for svc in [s for s in self.stats.held if s not in settings]:  # (no longer asked)
            del self.stats.held[svc]
        if stat is not None and settings:
            for svc, cfg in settings.items():
                if self._read(svc, cfg, stat, slots.get(svc, {}), up.get(svc, set()), now):
                    changed.add(svc)
            self.next_read = now + max(min(cfg.interval for cfg in settings.values()),
                                        COST * took)
        return changed

    def _read(self, svc: str, cfg: OutlierSettings, stat: Mapping[tuple[str, str],
              Mapping[str, str]], slots: Mapping[str, str], up: set[str], now: float) -> bool:
        candidates: list[tuple[int, str, _Tracked]] = []
        for slot, iid in slots.items():
            row = stat.get((svc, slot))
            if row is None or iid not in up:
                continue
            t = self._by_service.get(svc, {}).get(iid) or self._track((svc, iid), _Tracked())
            errors, ok = _counter(row, ERROR_FIELDS), _counter(row, OK_FIELDS)
            new_errors, new_ok = errors - t.errors, ok - t.ok
            first = t.errors < 0 or new_errors < 0 or new_ok < 0  # new, or HAProxy restarted
            t.errors, t.ok = errors, ok
            if first or t.until:
                t.held = t.held and not first  # (HAProxy restarted: its run starts again)
                continue
            if t.ejections and not t.run and now - t.back_at >= t.last_duration:
                t.ejections = 0  # clean for as long as it was last out: forgiven
            if new_ok:  # a success ends a run, unless errors outnumber successes in this read
                t.run = new_errors if new_errors > new_ok else 0
            else:
                t.run += new_errors
            if t.run >= cfg.consecutive_errors:
                why = _reason(row, new_errors, new_ok, t.run)
                candidates.append((t.run, iid, t))
                t.reason = why
            else:
                t.held = False  # its run ended: a later hold is a new one, logged again
        ejected = sum(1 for t in self._by_service.get(svc, {}).values() if t.until)
        cap = cfg.cap(len(up))
        changed = False
        held = 0
        for _, iid, t in sorted(candidates, key=lambda c: (-c[0], c[1])):
            if ejected >= cap:
                if not t.held:
                    log.warning("%s/%s: %s, but not ejected: %d of %d up instances are out "
                                "already (max_ejected)", svc, iid, t.reason, ejected, len(up))
                t.held, held = True, held + 1
                continue
            t.held = False
            t.ejections += 1
            t.last_duration = cfg.base_ejection * t.ejections
            t.until = now + t.last_duration
            ejected += 1
            changed = True
            self.stats.ejections[svc] = self.stats.ejections.get(svc, 0) + 1
            log.warning("%s/%s ejected for %.1fs (ejection %d): %s", svc, iid, t.last_duration,
                        t.ejections, t.reason)
        self.stats.held[svc] = held
        return changed

    def _readmit(self, key: tuple[str, str], t: _Tracked, now: float) -> None:
        t.until, t.run, t.back_at, t.errors = 0.0, 0, now, -1
        log.info("%s/%s back in after %.1fs out (ejection %d)", *key, t.last_duration,
                 t.ejections)

    def status(self) -> list[Ejection]:
        """Instances out now, soonest back first (``/v1/health``, ``/metrics``)."""
        now = self._clock()
        out = [Ejection(svc, iid, t.reason, t.ejections, max(0.0, t.until - now))
               for (svc, iid), t in self._items() if t.until]
        return sorted(out, key=lambda e: (e.remaining, e.service, e.instance_id))


def _reason(row: Mapping[str, str], errors: int, ok: int, run: int) -> str:
    parts = [f"{name} {row.get(name)}" for name in ERROR_FIELDS
             if row.get(name, "") not in ("", "0")]
    return (f"{run} errors in a row ({errors} errors, {ok} successes in the last interval; "
            f"counters {', '.join(parts) or 'none'})")



class OutlierCollector:
    """The detector's state at scrape time, for ``/metrics``."""

    def __init__(self, detector: OutlierDetector) -> None:
        self.detector = detector

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily("discovery_outlier_ejections",
                                    "Instances ejected for failing requests, by service.",
                                    labels=["service"])
        out = GaugeMetricFamily("discovery_outlier_ejected_instances",
                                "Instances ejected now, by service.", labels=["service"])
        held = GaugeMetricFamily("discovery_outlier_held_instances",
                                 "Instances over the error threshold kept in by max_ejected.",
                                 labels=["service"])
        stats = self.detector.stats
        now: dict[str, int] = {}
        for ejection in self.detector.status():
            now[ejection.service] = now.get(ejection.service, 0) + 1
        for svc in sorted(set(stats.ejections) | set(stats.held)):
            total.add_metric([svc], stats.ejections.get(svc, 0))
            out.add_metric([svc], now.get(svc, 0))
            held.add_metric([svc], stats.held.get(svc, 0))
        yield from (total, out, held)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def health(detector: OutlierDetector) -> dict[str, Any]:
    """The ``outliers`` component of ``/v1/health`` (ok: ejecting is the point, not a fault)."""
    return {"ok": True, "ejected": [
        {"service": e.service, "id": e.instance_id, "reason": e.reason,
         "ejections": e.ejections, "back_in_s": round(e.remaining, 1)}
        for e in detector.status()],
        "ejections": dict(detector.stats.ejections),
        "held_by_max_ejected": {k: v for k, v in detector.stats.held.items() if v}}
