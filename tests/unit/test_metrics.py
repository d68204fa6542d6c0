"""Metrics: every metric exists, each method moves the right series, labels stay bounded."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from discovery.metrics import (
    PROPAGATION_BUCKETS,
    Metrics,
    check_type,
    docker_action,
)
from discovery.model import Instance
from discovery.watcher.router import RouterStats

ALL = {
    "discovery_registrations": "counter",
    "discovery_deregistrations": "counter",
    "discovery_docker_events": "counter",
    "discovery_checks": "counter",
    "discovery_warmup_requests": "counter",
    "discovery_haproxy_runtime_ops": "counter",
    "discovery_haproxy_reloads": "counter",
    "discovery_render_errors": "counter",
    "discovery_haproxy_errors": "counter",
    "discovery_dns_queries": "counter",
    "discovery_registry_connected": "gauge",
    "discovery_docker_connected": "gauge",
    "discovery_agent_writes_pending": "gauge",
    "discovery_catalog_instances": "gauge",
    "discovery_catalog_index": "gauge",
    "discovery_haproxy_last_reload_timestamp_seconds": "gauge",
    "discovery_propagation_seconds": "histogram",
}


def families(m: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(m.exposition().decode())}


def val(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def inst(registered_at: float) -> Instance:
    return Instance(service="web", id="h1:0123456789ab:80", node="h1", address="127.0.0.1",
                    port=8080, registered_at=registered_at)


def test_every_metric_is_exposed_from_the_start() -> None:
    found = families(Metrics())
    for name, kind in ALL.items():
        assert found.get(name) == kind, name


def test_exposition_after_every_call() -> None:
    m = Metrics()
    m.registered()
    m.registered(2)
    m.deregistered()
    m.docker_event("start")
    m.docker_event("health_status: healthy")
    m.check("http", True)
    m.check("http", False)
    m.check("tcp", False)
    m.runtime_ops(3)
    m.runtime_ops(0)
    m.warmup(200, 3)
    m.reloaded(at=1234.5)
    m.render_error()
    m.haproxy_error()
    m.dns_query("SRV", "NOERROR")
    m.dns_query("a", "nxdomain")
    m.registry_state(True)
    m.docker_state(False)
    m.propagation(0.02)
    m.catalog(7, 42)
    text = m.exposition().decode()
    for name in ALL:
        assert name in text
    assert val(m, "discovery_registrations_total") == 3
    assert val(m, "discovery_deregistrations_total") == 1
    assert val(m, "discovery_docker_events_total", action="start") == 1
    assert val(m, "discovery_docker_events_total", action="health_status") == 1
    assert val(m, "discovery_checks_total", type="http", result="pass") == 1
    assert val(m, "discovery_checks_total", type="http", result="fail") == 1
    assert val(m, "discovery_checks_total", type="tcp", result="fail") == 1
    assert val(m, "discovery_checks_total", type="exec", result="pass") == 0
    assert val(m, "discovery_haproxy_runtime_ops_total") == 3
    assert val(m, "discovery_warmup_requests_total", result="answered") == 197
    assert val(m, "discovery_warmup_requests_total", result="error") == 3
    assert val(m, "discovery_haproxy_reloads_total") == 1
    assert val(m, "discovery_haproxy_last_reload_timestamp_seconds") == 1234.5
    assert val(m, "discovery_render_errors_total") == 1
    assert val(m, "discovery_haproxy_errors_total") == 1
    assert val(m, "discovery_dns_queries_total", qtype="SRV", rcode="NOERROR") == 1
    assert val(m, "discovery_dns_queries_total", qtype="A", rcode="NXDOMAIN") == 1
    assert val(m, "discovery_registry_connected") == 1
    assert val(m, "discovery_docker_connected") == 0
    assert val(m, "discovery_catalog_instances") == 7
    assert val(m, "discovery_catalog_index") == 42
    assert val(m, "discovery_propagation_seconds_count") == 1
    assert val(m, "discovery_propagation_seconds_bucket", le="0.025") == 1
    assert val(m, "discovery_propagation_seconds_bucket", le="0.01") == 0
    assert m.content_type.startswith("text/plain")


def test_propagation_buckets_span_5ms_to_10s() -> None:
    assert PROPAGATION_BUCKETS[0] == 0.005 and PROPAGATION_BUCKETS[-1] == 10.0
    m = Metrics()
    buckets = {s.labels["le"] for f in text_string_to_metric_families(m.exposition().decode())
               if f.name == "discovery_propagation_seconds" for s in f.samples
               if s.name.endswith("_bucket")}
    assert {"0.005", "10.0", "+Inf"} <= buckets


def test_instances_are_independent_and_not_global() -> None:
    a, b = Metrics(), Metrics()
    a.registered()
    assert val(a, "discovery_registrations_total") == 1
    assert val(b, "discovery_registrations_total") == 0
    assert REGISTRY.get_sample_value("discovery_registrations_total") is None


def test_propagated_from_registered_at() -> None:
    m = Metrics()
    assert m.propagated(inst(1000.0), now=1000.25) == 0.25
    assert m.propagated(inst(1000.0), now=999.0) == 0.0  # clock skew: counts as 0
    assert m.propagated(inst(0.0), now=1000.0) is None  # no timestamp
    assert m.propagated(inst(1000.0), now=1000.0 + 3600) is None  # a replay, not propagation
    assert val(m, "discovery_propagation_seconds_count") == 2
    assert val(m, "discovery_propagation_seconds_sum") == 0.25


def test_sync_router_counts_only_the_increase() -> None:
    m = Metrics()
    stats = RouterStats(reloads=1, runtime_ops=10, render_errors=0, haproxy_errors=2,
                        last_reload=500.0)
    m.sync_router(stats)
    m.sync_router(stats)  # nothing new
    assert val(m, "discovery_haproxy_reloads_total") == 1
    assert val(m, "discovery_haproxy_runtime_ops_total") == 10
    assert val(m, "discovery_haproxy_errors_total") == 2
    stats.runtime_ops, stats.render_errors = 14, 1
    m.sync_router(stats)
    assert val(m, "discovery_haproxy_runtime_ops_total") == 14
    assert val(m, "discovery_render_errors_total") == 1
    assert val(m, "discovery_haproxy_last_reload_timestamp_seconds") == 500.0


@pytest.mark.parametrize(("action", "label"), [
    ("die", "die"), ("health_status: unhealthy", "health_status"),
    ("exec_start: sh -c 'rm -rf /'", "exec_start"), ("Start", "start"),
    ("made-up-action-12345", "other"), ("", "other"),
])
def test_docker_actions_are_bounded(action: str, label: str) -> None:
    assert docker_action(action) == label


@pytest.mark.parametrize(("kind", "label"), [
    ("tcp", "tcp"), ("HTTP", "http"), ("my_plugin.v2", "my_plugin.v2"),
    ("x" * 33, "other"), ("a b", "other"), ("", "other"),
])
def test_check_types_are_bounded(kind: str, label: str) -> None:
    assert check_type(kind) == label


def test_dns_labels_are_bounded() -> None:
    m = Metrics()
    m.dns_query("TYPE65280", "BADCOOKIE")
    m.dns_query("srv", "servfail")
    m.dns_query("NONE", "DROPPED")
    assert val(m, "discovery_dns_queries_total", qtype="OTHER", rcode="OTHER") == 1
    assert val(m, "discovery_dns_queries_total", qtype="SRV", rcode="SERVFAIL") == 1
    assert val(m, "discovery_dns_queries_total", qtype="NONE", rcode="DROPPED") == 1


def test_a_registry_followed_twice_is_counted_once() -> None:
    """``up``'s agent and watcher share one registry client: its bytes count once."""
    from discovery.registry.reads import ReadStats

    class Reg:
        reads = ReadStats()
        invalid_records = 3

    m, reg = Metrics(), Reg()
    reg.reads.add("k", b"12345")
    m.follow_registry(reg)  # type: ignore[arg-type]
    m.follow_registry(reg)  # type: ignore[arg-type]
    assert val(m, "discovery_registry_read_bytes_total") == 6
    assert val(m, "discovery_registry_invalid_records_total") == 3


def test_a_listing_counts_its_names_as_keys_without_values() -> None:
    from discovery.registry.reads import ReadCounts, ReadStats

    reads = ReadStats()
    reads.add("k", b"12345")
    reads.listed(name for name in ("web", "db1"))  # any iterable, once
    reads.listed([])
    assert reads.counts() == ReadCounts(bytes=6 + 6, keys=3)


def test_metrics_count_the_catalog_without_listing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/metrics`` reads the catalog's size, kept as changes come, instead of sorting every
    instance to count them: the same figure, draining instances and every change included."""
    from discovery.lookup.http import HttpApi
    from discovery.model import State
    from discovery.model.catalog import Catalog
    from discovery.registry.base import Change, Snapshot

    def one(n: int, service: str = "web", **kw: Any) -> Instance:
        return Instance(service=service, id=f"h{n}:{n:012x}:80", node=f"h{n}",
                        address=f"192.0.2.{n}", port=80, **kw)

    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in [one(1), one(2, state=State.DRAINING),
                                               one(3, "db"), one(4, "db")]}))
    for change in (Change("put", one(5, "new").key, one(5, "new")),
                   Change("put", one(1).key, one(1, weight=0)),
                   Change("delete", one(3, "db").key)):
        catalog.apply(change)
    everyone = len(catalog.instances())
    m = Metrics()
    api = HttpApi(catalog, dict, m)

    def listed(*args: object, **kw: object) -> list[Instance]:
        raise AssertionError("every instance listed and sorted to count them")
    monkeypatch.setattr(catalog, "instances", listed)
    assert api.handle("/metrics").status == 200
    assert val(m, "discovery_catalog_instances") == everyone == 4
    assert val(m, "discovery_catalog_index") == catalog.index
