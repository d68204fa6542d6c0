"""Prometheus metrics of one agent or watcher process.

:class:`Metrics` owns its own :class:`CollectorRegistry` (never the global default one), so
several agents and watchers can live in one process or one test run. The agent and the
watcher call its small typed methods where things happen; ``GET /metrics``
(:mod:`discovery.lookup.http`) serves :meth:`Metrics.exposition`.

Label values that come from outside (Docker event actions, DNS query types and rcodes,
check types) are folded into a bounded set, so nobody can grow the series count at will.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from discovery.propagation import Stages

if TYPE_CHECKING:
    from discovery.model import Instance
    from discovery.registry import Registry
    from discovery.watcher.outlier import OutlierDetector
    from discovery.watcher.router import RouterStats


#: from 5 ms to 10 s: a registry write normally reaches the watcher in milliseconds
PROPAGATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: an instance older than this when applied is a replay (restart, resync), not propagation
PROPAGATION_MAX_AGE = 300.0

DOCKER_ACTIONS = frozenset({
    "attach", "commit", "copy", "create", "destroy", "detach", "die", "exec_create",
    "exec_detach", "exec_die", "exec_start", "export", "health_status", "kill", "oom",
    "pause", "rename", "resize", "restart", "start", "stop", "top", "unpause", "update",
})
DNS_QTYPES = frozenset({  # NONE: no parsable question (dropped packet)
    "A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT", "NONE",
})
DNS_RCODES = frozenset({  # DROPPED: not answered at all (malformed, or rate-limited)
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "DROPPED",
})
OTHER = "other"


def _fold(value: str, known: frozenset[str], *, upper: bool = False) -> str:
    value = value.strip().upper() if upper else value.strip().lower()
    return value if value in known else (OTHER.upper() if upper else OTHER)


def docker_action(action: str) -> str:
    """``"health_status: healthy"`` → ``"health_status"``; unknown actions → ``"other"``."""
    return _fold(action.partition(":")[0], DOCKER_ACTIONS)


def check_type(kind: str) -> str:
    """A check type (or plugin name) as a label value: a short lowercase token."""
    kind = kind.strip().lower()
    ok = 0 < len(kind) <= 32 and all(c.isalnum() or c in "-_." for c in kind)
    return kind if ok else OTHER


class _Summed:
    """A counter read from the registries at scrape time (they count, e.g. what their
    decoders skip or what they read), summed over every registry this process opened."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.sources: list[Callable[[], int]] = []

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation,
                                  value=sum(source() for source in self.sources))


class Metrics:
    """Every metric of discovery, registered in one private :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.registrations = Counter(
            "discovery_registrations", "Instances written to the registry by the agent.",
            registry=r)
        self.deregistrations = Counter(
            "discovery_deregistrations", "Instances removed from the registry by the agent.",
            registry=r)
        self.docker_events = Counter(
            "discovery_docker_events", "Docker container events received, by action.",
            ["action"], registry=r)
        self.checks = Counter(
            "discovery_checks", "Health check runs, by check type and result (pass|fail).",
            ["type", "result"], registry=r)
        self.warmup_requests = Counter(
            "discovery_warmup_requests", "Warm-up requests the agent sent new instances before "
            "registering them, by result (answered|error).", ["result"], registry=r)
        self.haproxy_runtime_ops = Counter(
            "discovery_haproxy_runtime_ops", "Server slots changed through HAProxy's runtime API.",
            registry=r)
        self.haproxy_reloads = Counter(
            "discovery_haproxy_reloads", "HAProxy reloads with a new configuration.", registry=r)
        self.render_errors = Counter(
            "discovery_render_errors",
            "HAProxy configurations that failed to render or to validate (not installed).",
            registry=r)
        self.haproxy_errors = Counter(
            "discovery_haproxy_errors",
            "HAProxy failures: reload or start failed, runtime commands refused.", registry=r)
        self._dns_children: dict[tuple[str, str], Any] = {}
        self.dns_queries = Counter(
            "discovery_dns_queries", "DNS queries answered, by query type and response code.",
            ["qtype", "rcode"], registry=r)
        self.registry_connected = Gauge(
            "discovery_registry_connected", "1 while connected to the registry, else 0.",
            registry=r)
        self.docker_connected = Gauge(
            "discovery_docker_connected", "1 while connected to dockerd, else 0.", registry=r)
        self.writes_pending = Gauge(
            "discovery_agent_writes_pending",
            "Registry writes the agent has decided and not yet made (the one under way too).",
            registry=r)
        self.catalog_instances = Gauge(
            "discovery_catalog_instances", "Instances in the watcher's catalog.", registry=r)
        self.catalog_index = Gauge(
            "discovery_catalog_index",
            "The catalog's change index (X-Discovery-Index of the HTTP API).", registry=r)
        self.last_reload = Gauge(
            "discovery_haproxy_last_reload_timestamp_seconds",
            "Unix time of the last HAProxy reload (0: none yet).", registry=r)
        self.guard_held = Gauge(
            "discovery_wipe_guard_held_instances",
            "Instances removed from the registry but still served by the wipe guard.",
            registry=r)
        self.guard_engaged = Counter(
            "discovery_wipe_guard_engaged",
            "Times the wipe guard saw a registry wipe and held services that would go empty.",
            registry=r)
        self.propagation_seconds = Histogram(
            "discovery_propagation_seconds",
            "Time from an instance's registered_at (the agent's write) to the watcher "
            "applying it to its catalog.", buckets=PROPAGATION_BUCKETS, registry=r)
        self.stages = Stages(r)  # discovery_propagation_stage_seconds{stage}
        self._invalid = _Summed(
            "discovery_registry_invalid_records", "Registry values skipped as malformed (each "
            "is named in the log, at most once per key a minute).")
        self._read_bytes = _Summed(
            "discovery_registry_read_bytes", "Bytes of keys and values read from the registry "
            "(snapshots, per-node reads, watch events).")
        r.register(self._invalid)
        r.register(self._read_bytes)
        self._followed: list[object] = []  # the ReadStats of the registries followed
        self._lock = threading.Lock()
        self._router_seen = (0, 0, 0, 0)
        self._guard_engaged_seen = 0
        for outcome in ("answered", "error"):
            self.warmup_requests.labels(result=outcome)
        for kind in ("tcp", "http", "exec"):  # common series exist at 0 from the start
            for result in ("pass", "fail"):
                self.checks.labels(type=kind, result=result)

    # ---- agent -----------------------------------------------------------------------------
    def registered(self, n: int = 1) -> None:
        """``n`` instances were written to the registry."""
        self.registrations.inc(n)

    def deregistered(self, n: int = 1) -> None:
        """``n`` instances were removed from the registry."""
        self.deregistrations.inc(n)

    def docker_event(self, action: str) -> None:
        """One Docker event (its ``Action``, e.g. ``"die"`` or ``"health_status: healthy"``)."""
        self.docker_events.labels(action=docker_action(action)).inc()

    def follow_writes(self, pending: Callable[[], int]) -> None:
        """``discovery_agent_writes_pending`` reads ``pending()`` at each scrape."""
        self.writes_pending.set_function(pending)

    def docker_state(self, up: bool) -> None:
        self.docker_connected.set(1 if up else 0)

    def check(self, kind: str, ok: bool) -> None:
        """One health check run of type ``kind`` (``tcp``, ``http``, a plugin name…)."""
        self.checks.labels(type=check_type(kind), result="pass" if ok else "fail").inc()

    # ---- both ------------------------------------------------------------------------------
    def warmup(self, sent: int, errors: int) -> None:
        """One instance's warm-up: ``sent`` requests, ``errors`` of them unanswered."""
        self.warmup_requests.labels(result="answered").inc(sent - errors)
        self.warmup_requests.labels(result="error").inc(errors)

    def registry_state(self, up: bool) -> None:
        self.registry_connected.set(1 if up else 0)

    def follow_registry(self, registry: Registry) -> None:
        """Count ``registry``'s skipped malformed values and read bytes in /metrics (once per
        registry: ``up``'s agent and watcher share one)."""
        if any(r is registry.reads for r in self._followed):
            return
        self._followed.append(registry.reads)
        self._invalid.sources.append(lambda: registry.invalid_records)
        self._read_bytes.sources.append(lambda: registry.reads.bytes)

    # ---- watcher ---------------------------------------------------------------------------
    def runtime_ops(self, n: int = 1) -> None:
        """``n`` server slots were set through HAProxy's runtime API."""
        if n > 0:
            self.haproxy_runtime_ops.inc(n)

    def reloaded(self, at: float | None = None) -> None:
        """HAProxy was reloaded (at unix time ``at``, default now)."""
        self.haproxy_reloads.inc()
        self.last_reload.set(time.time() if at is None else at)

    def render_error(self) -> None:
        self.render_errors.inc()

    def haproxy_error(self) -> None:
        self.haproxy_errors.inc()

    def sync_router(self, stats: RouterStats) -> None:
        """Catch up with a router's own counters (call after every ``Router.sync``).

        Use this *or* :meth:`runtime_ops` / :meth:`reloaded` / :meth:`render_error` /
        :meth:`haproxy_error`, not both: only the increase since the last call is counted.
        """
        now = (stats.reloads, stats.runtime_ops, stats.render_errors, stats.haproxy_errors)
        with self._lock:
            before, self._router_seen = self._router_seen, now
        reloads, ops, render, haproxy = (max(0, a - b) for a, b in zip(now, before, strict=True))
        if reloads:
            self.haproxy_reloads.inc(reloads)
        if ops:
            self.haproxy_runtime_ops.inc(ops)
        if render:
            self.render_errors.inc(render)
        if haproxy:
            self.haproxy_errors.inc(haproxy)
        if stats.last_reload:
            self.last_reload.set(stats.last_reload)

    def follow_outliers(self, detector: OutlierDetector) -> None:
        """Serve a router's outlier ejections (``discovery_outlier_*``) at scrape time."""
        from discovery.watcher.outlier import OutlierCollector

        self.registry.register(OutlierCollector(detector))

    def wipe_guard(self, holding: int, engaged: int) -> None:
        """The wipe guard's state: instances held now, and times it engaged so far."""
        self.guard_held.set(holding)
        with self._lock:
            new, self._guard_engaged_seen = engaged - self._guard_engaged_seen, engaged
        if new > 0:
            self.guard_engaged.inc(new)

    def propagation(self, seconds: float) -> None:
        self.propagation_seconds.observe(max(0.0, seconds))

    def propagated(self, instance: Instance, now: float | None = None,
                   received: float | None = None) -> float | None:
        """Observe how long ``instance`` took from its ``registered_at`` to now (applied), and
        its stages (:class:`~discovery.propagation.Stages`; ``received``: when the watcher got
        the change, default now).

        Skipped (``None``) for records without a timestamp and for ones older than
        :data:`PROPAGATION_MAX_AGE` (a replay, not a propagation). Clock skew between hosts
        can make the age negative: it counts as 0.
        """
        applied = time.time() if now is None else now
        self.stages.observe(instance, applied if received is None else received, applied)
        if instance.registered_at <= 0:
            return None
        age = applied - instance.registered_at
        if age > PROPAGATION_MAX_AGE:
            return None
        self.propagation(age)
        return max(0.0, age)

    def catalog(self, size: int, index: int) -> None:
        self.catalog_instances.set(size)
        self.catalog_index.set(index)

    # ---- DNS -------------------------------------------------------------------------------
    def dns_query(self, qtype: str, rcode: str) -> None:
        """One DNS query answered: ``qtype`` like ``"SRV"``, ``rcode`` like ``"NXDOMAIN"``.

        On the DNS hot path: the labelled child is cached per (qtype, rcode) pair (a bounded
        set, since both are folded to known values)."""
        child = self._dns_children.get((qtype, rcode))
        if child is None:
            child = self.dns_queries.labels(qtype=_fold(qtype, DNS_QTYPES, upper=True),
                                            rcode=_fold(rcode, DNS_RCODES, upper=True))
            if len(self._dns_children) < 1024:
                self._dns_children[(qtype, rcode)] = child
        child.inc()

    # ---- exposition ------------------------------------------------------------------------
    #: what generate_latest writes (newer prometheus-client's CONTENT_TYPE_LATEST says 1.0.0)
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)
