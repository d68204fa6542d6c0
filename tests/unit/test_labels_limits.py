"""discovery.agent.labels: check limits (timeout <= interval <= 60 s) and the zone label."""

from __future__ import annotations

import re
from typing import Any

import pytest

from discovery.agent.config import read_file
from discovery.agent.labels import parse_container
from discovery.agent.spec import CheckSpec
from discovery.errors import ConfigError, LabelError
from tests.unit.test_labels import WHO, container

# ---- check limits (issue 8 §3): timeout <= interval <= 60 s, exec interval >= 1 s -------


@pytest.mark.parametrize(
    ("labels", "defaults", "culprit", "reason"),
    [
        ({"discovery.check.interval": "61s"}, None, "discovery.check.interval",
         "between 50ms and 1m"),
        ({"discovery.check.timeout": "1h"}, None, "discovery.check.timeout",
         "between 50ms and 1m"),
        ({"discovery.check.interval": "1s", "discovery.check.timeout": "2s"}, None,
         "discovery.check.timeout", "2s is longer than the interval (1s)"),
        ({"discovery.check.timeout": "5s"}, None,  # the default interval is 2 s
         "discovery.check.timeout", "5s is longer than the interval (2s)"),
        ({"discovery.80.check.interval": "1s", "discovery.80.check.timeout": "1.5"}, None,
         "discovery.80.check.timeout", "longer than the interval"),
        ({"discovery.check": "exec", "discovery.check.command": "true",
          "discovery.check.interval": "500ms"}, None,
         "discovery.check.interval", "too short for an exec check (at least 1s)"),
        ({"discovery.check": "exec", "discovery.check.command": "true",
          "discovery.check.interval": "50ms"}, None,
         "discovery.check.interval", "too short for an exec check"),
        # the agent's [agent.check] default interval is too short for this container's exec
        ({"discovery.check": "exec", "discovery.check.command": "true"},
         CheckSpec(interval=0.2, timeout=0.2), "discovery.check.interval", "too short"),
    ],
    ids=["interval 61s", "timeout 1h", "timeout > interval", "timeout > default interval",
         "per port", "exec 500ms", "exec 50ms", "exec under a short default"],
)
def test_check_limits(
    labels: dict[str, str], defaults: CheckSpec | None, culprit: str, reason: str
) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container({"discovery.service": "web", **labels}), defaults=defaults)
    assert info.value.culprit == f"{WHO} label {culprit}"
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("labels", "interval", "timeout"),
    [
        ({"discovery.check.interval": "200ms"}, 0.2, 0.2),  # the 1 s default timeout shortened
        ({"discovery.check.interval": "1m", "discovery.check.timeout": "1m"}, 60, 60),
        ({"discovery.check": "exec", "discovery.check.command": "true",
          "discovery.check.interval": "1s", "discovery.check.timeout": "1s"}, 1, 1),
        ({}, 2, 1),
    ],
)
def test_check_limits_kept(labels: dict[str, str], interval: float, timeout: float) -> None:
    [spec] = parse_container(container({"discovery.service": "web", **labels}))
    assert (spec.check.interval, spec.check.timeout) == (interval, timeout)


@pytest.mark.parametrize(
    ("table", "culprit"),
    [
        ("interval = 90", "[agent.check] interval: 90 is not between 50ms and 1m"),
        ('interval = "1s"\ntimeout = "2s"', "[agent.check] timeout: 2s is longer than the"),
        ('type = "exec"\ninterval = 0.5', "[agent.check] interval: 0.5s is too short for an exec"),
        ('interval = "soon"', "[agent.check] interval: 'soon' is not a duration"),
        ("colour = 1", "[agent.check] takes only"),
        # rise/fall and the type as their labels: refused at load, not per container later
        ("rise = 0", "[agent.check] rise: '0' is not a whole number in 1..100"),
        ('fall = "3"', "[agent.check] fall: '3' is not a whole number in 1..100"),
        ("fall = 2.5", "[agent.check] fall: '2.5' is not a whole number in 1..100"),
        ("rise = true", "[agent.check] rise: 'True' is not a whole number in 1..100"),
        ('type = "bogus"', "[agent.check] type: unknown check type 'bogus' (known: docker,"),
    ],
)
def test_agent_config_check_limits(tmp_path: Any, table: str, culprit: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[agent.check]\n{table}\n")
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        read_file(str(path))


def test_agent_config_check_durations(tmp_path: Any) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent.check]\ninterval = "500ms"\nrise = 2\n')
    assert read_file(str(path))["check"] == CheckSpec(interval=0.5, timeout=0.5, rise=2)
    path.write_text('[agent.check]\ninterval = 5\ntimeout = "1.5s"\n')
    assert read_file(str(path))["check"] == CheckSpec(interval=5, timeout=1.5)


def test_zone_label_per_container_and_per_port() -> None:
    specs = parse_container(container({"discovery.service": "web", "discovery.zone": "eu-1"}))
    assert [s.zone for s in specs] == ["eu-1"]
    assert parse_container(container({"discovery.service": "web"}))[0].zone == ""
    specs = parse_container(container({"discovery.80.service": "web", "discovery.zone": "eu-1",
                                       "discovery.80.zone": "eu-2"}))
    assert [s.zone for s in specs] == ["eu-2"]


@pytest.mark.parametrize("zone", ["EU-1", "eu 1", "-eu", "z" * 64, "eu\n1"])
def test_zone_label_not_a_dns_label_skips_the_container(zone: str) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container({"discovery.service": "web", "discovery.zone": zone}))
    assert "discovery.zone" in str(info.value) and "\n" not in str(info.value)


def test_agent_zone_is_a_dns_label() -> None:
    from discovery.agent.config import AgentConfig

    assert AgentConfig(registry="etcd://h", zone="eu-1").validated().zone == "eu-1"
    assert AgentConfig(registry="etcd://h").validated().zone == ""
    with pytest.raises(ConfigError, match="--zone"):
        AgentConfig(registry="etcd://h", zone="Eu_1").validated()


# ---- many ports: each label read a bounded number of times ---------------------------------


class CountingTable(dict[str, Any]):
    """The folded label table, counting how often it is read whole."""

    reads = 0

    def items(self) -> Any:
        type(self).reads += 1
        return super().items()


def test_a_container_of_hundreds_of_ports_reads_its_labels_a_few_times(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each port's meta and check parameters were found by reading every label of the
    container (twice each): 1,000 services took 1.0 s (0.04 s now) under the agent's lock,
    which held every other container's events and checks meanwhile."""
    from discovery.agent import labels as module

    collect = module._collect

    def counted(attrs: dict[str, Any], who: str) -> Any:
        table, problems, asked = collect(attrs, who)
        return CountingTable(table), problems, asked

    monkeypatch.setattr(module, "_collect", counted)
    ports = range(10000, 10300)
    labels = {f"discovery.{p}.service": f"svc-{p}" for p in ports}
    labels |= {f"discovery.{p}.meta.shard": str(p) for p in ports}
    labels |= {"discovery.meta.region": "eu", "discovery.check.path": "/health",
               "discovery.check": "http", "discovery.10001.check.path": "/ready"}
    attrs = container(labels, exposed=tuple(f"{p}/tcp" for p in ports), published={},
                      network="host")
    CountingTable.reads = 0
    specs = parse_container(attrs)
    assert len(specs) == 300 and CountingTable.reads <= 3, CountingTable.reads
    by_port = {s.container_port: s for s in specs}
    assert dict(by_port[10000].meta) == {"region": "eu", "shard": "10000"}
    assert by_port[10000].check.params["path"] == "/health"
    assert by_port[10001].check.params["path"] == "/ready"  # the port's own overrides
