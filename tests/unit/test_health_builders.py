"""What ``/v1/health`` reports, built from a watcher's and an agent's state (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from discovery.lookup.status import agent_health, watcher_health
from discovery.model.catalog import Catalog
from discovery.watcher.guard import WipeGuard
from discovery.watcher.outlier import OutlierDetector
from discovery.watcher.router import RouterStats
from tests.harness.client_calls import sample_catalog


@pytest.fixture
def catalog() -> Catalog:
    return sample_catalog()


def test_health_builders(catalog: Catalog) -> None:
    stats = RouterStats(reloads=2, last_reload=100.0)
    stats.note("reload")
    watcher: Any = SimpleNamespace(
        registry_connected=True, registry=SimpleNamespace(url="etcd://h:2379/d"),
        catalog=catalog, guard=WipeGuard(catalog),
        router=SimpleNamespace(stats=stats, control=None, outliers=OutlierDetector()))
    health = watcher_health(watcher)()
    assert health["registry"] == {"ok": True, "url": "etcd://h:2379/d"}
    assert health["wipe_guard"]["ok"] is True and health["wipe_guard"]["holding"] == 0
    assert health["outliers"]["ok"] is True
    assert health["catalog"]["instances"] == 4 and health["catalog"]["ok"] is True
    assert health["haproxy"]["ok"] is True and health["haproxy"]["reloads"] == 2
    stats.last_error = "boom"
    stats.note("failed")
    assert watcher_health(watcher)()["haproxy"]["ok"] is False
    status = {"docker_connected": True, "containers": 3, "registered": 2,
              "registry_connected": False}
    agent: Any = SimpleNamespace(status=lambda: status,
                                 registry=SimpleNamespace(url="zk://h:2181/d"))
    health = agent_health(agent)()
    assert health["docker"]["ok"] is True and health["registry"]["ok"] is False
    assert set(agent_health(agent, "agent_")()) == {"agent_docker", "agent_registry"}
    assert set(watcher_health(watcher, "w_")()) == {"w_registry", "w_catalog", "w_haproxy",
                                                    "w_wipe_guard", "w_outliers"}
