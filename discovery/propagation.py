"""Propagation timing per stage: Docker event → registry write → watcher received → HAProxy
applied.

The agent stamps each record with ``seen_at`` (when it saw the cause of the write: a Docker
event, a check transition, a maintenance call) and ``written_at``; the watcher adds when it
received the change and when it applied it to HAProxy (its catalog, without a router).
:class:`Stages` turns those four stamps into ``discovery_propagation_stage_seconds{stage}``
and keeps the recent ones for the status page. Stamps come from two hosts' clocks: a negative
duration (skew) counts as 0, one below -:data:`MAX_AGE` (a clock far off, a stamp written by
hand) not at all; anything older than :data:`MAX_AGE` is a replay, not counted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram

if TYPE_CHECKING:
    from discovery.model import Instance
    from discovery.model.catalog import Key

#: (stage, from stamp, to stamp); ``event_to_write`` includes the health checks' rise
STAGES = (("event_to_write", "seen_at", "written_at"),
          ("write_to_received", "written_at", "received_at"),
          ("received_to_applied", "received_at", "applied_at"),
          ("event_to_applied", "seen_at", "applied_at"))
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_AGE = 300.0  # a record older than this when received is a replay (restart, resync)
RECENT = 256  # timings kept for the status page's percentiles
PER_INSTANCE = 1000  # instances whose last timing is kept


class Stages:
    """The per-stage histogram of one process, and its recent timings."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "discovery_propagation_stage_seconds",
            "Propagation per stage: event_to_write (Docker event or check transition seen by "
            "the agent → registry write), write_to_received (→ the watcher got the change), "
            "received_to_applied (→ applied to HAProxy), event_to_applied (end to end).",
            ["stage"], buckets=BUCKETS, registry=registry)
        for stage, _, _ in STAGES:  # every series exists from the start
            self.histogram.labels(stage=stage)
        self._lock = threading.Lock()
        self._recent: deque[dict[str, float]] = deque(maxlen=RECENT)
        # (service, id) -> the last timing: one id can be registered under two services
        self._last: OrderedDict[Key, dict[str, Any]] = OrderedDict()

    def observe(self, instance: Instance, received: float, applied: float) -> dict[str, float]:
        """Count one applied record; returns its stage durations (seconds)."""
        stamps = {"seen_at": instance.seen_at, "written_at": instance.written_at,
                  "received_at": received, "applied_at": applied}
        if instance.written_at and received - instance.written_at > MAX_AGE:
            return {}
        durations: dict[str, float] = {}
        for stage, start, end in STAGES:
            if stamps[start] > 0 and stamps[end] > 0:
                seconds = stamps[end] - stamps[start]
                if -MAX_AGE <= seconds <= MAX_AGE:  # further back: a clock far off, no skew
                    durations[stage] = seconds = max(0.0, seconds)
                    self.histogram.labels(stage=stage).observe(seconds)
        key = (instance.service, instance.id)
        with self._lock:
            self._recent.append(durations)
            self._last[key] = {**{k: v or None for k, v in stamps.items()}, **durations}
            self._last.move_to_end(key)
            while len(self._last) > PER_INSTANCE:
                self._last.popitem(last=False)
        return durations

    def of(self, service: str, instance_id: str) -> dict[str, Any] | None:
        """The last timing of one instance of ``service`` (stamps and durations), if any."""
        with self._lock:
            found = self._last.get((service, instance_id))
            return dict(found) if found is not None else None

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per stage over the recent records: count, p50, p90, p99 and max (seconds)."""
        with self._lock:
            recent = list(self._recent)
        out: dict[str, dict[str, float | int | None]] = {}
        for stage, _, _ in STAGES:
            values = sorted(d[stage] for d in recent if stage in d)
            out[stage] = {"count": len(values), "p50": _pct(values, 0.5),
                          "p90": _pct(values, 0.9), "p99": _pct(values, 0.99),
                          "max": values[-1] if values else None}
        return out


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, min(len(values), int(q * len(values) + 0.999999)))
    return values[rank - 1]
