"""discovery.agent.labels: container inspect dict -> ServiceSpecs, or a LabelError."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.agent import checks
from discovery.agent.config import read_file
from discovery.agent.labels import parse_container
from discovery.agent.spec import CheckSpec, ServiceSpec
from discovery.errors import ConfigError, LabelError, ValidationError
from discovery.model import Instance, make_instance_id

CID = "3f2a" * 16
WHO = "container web-1 (3f2a3f2a3f2a)"


def container(
    labels: dict[str, str] | None = None,
    env: list[str] | None = None,
    exposed: tuple[str, ...] = ("80/tcp",),
    published: dict[str, str] | None = None,
    network: str = "bridge",
    healthcheck: list[str] | None = None,
    ip: str = "203.0.113.5",
    networks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A trimmed-down ``docker inspect`` dict. ``published``: {"80/tcp": "32768"}."""
    published = {"80/tcp": "32768"} if published is None else published
    ports: dict[str, Any] = {p: None for p in exposed}
    for p, host in published.items():
        ports[p] = [{"HostIp": "0.0.0.0", "HostPort": host}, {"HostIp": "::", "HostPort": host}]
    config: dict[str, Any] = {
        "Labels": labels or {},
        "Env": ["PATH=/usr/bin", *(env or [])],
        "ExposedPorts": {p: {} for p in exposed},
        "Image": "web:1",
    }
    if healthcheck is not None:
        config["Healthcheck"] = {"Test": healthcheck}
    return {
        "Id": CID,
        "Name": "/web-1",
        "Config": config,
        "HostConfig": {"NetworkMode": network, "PortBindings": {}},
        "NetworkSettings": {
            "IPAddress": ip,
            "Ports": {} if network == "host" else ports,
            "Networks": networks or {},
        },
    }


def brief(specs: list[ServiceSpec]) -> list[tuple[Any, ...]]:
    return [(s.service, s.container_port, s.address, s.port) for s in specs]


# ---- which services, at which address ----------------------------------------------------

ADDRESSING = [
    (
        "single exposed port inferred, published",
        container({"discovery.service": "web"}),
        {},
        [("web", 80, "127.0.0.1", 32768)],
    ),
    (
        "advertise address used for published ports",
        container({"discovery.service": "web"}),
        {"advertise": "192.0.2.7"},
        [("web", 80, "192.0.2.7", 32768)],
    ),
    (
        "explicit port among several",
        container(
            {"discovery.service": "web", "discovery.port": "8080"},
            exposed=("80/tcp", "8080/tcp"),
            published={"8080/tcp": "40000"},
        ),
        {},
        [("web", 8080, "127.0.0.1", 40000)],
    ),
    (
        "published but not exposed counts",
        container(
            {"discovery.service": "web", "discovery.port": "9000"}, published={"9000/tcp": "9001"}
        ),
        {},
        [("web", 9000, "127.0.0.1", 9001)],
    ),
    (
        "port without /tcp suffix is tcp",
        container({"discovery.service": "web"}, exposed=("80",), published={}),
        {"internal": True},
        [("web", 80, "203.0.113.5", 80)],
    ),
    (
        "host network: advertise + container port, EXPOSE not needed",
        container(
            {"discovery.service": "web", "discovery.port": "8080"}, exposed=(), network="host"
        ),
        {"advertise": "192.0.2.1"},
        [("web", 8080, "192.0.2.1", 8080)],
    ),
    (
        "host network: single exposed port inferred",
        container({"discovery.service": "web"}, network="host"),
        {},
        [("web", 80, "127.0.0.1", 80)],
    ),
    (
        "internal: container IP and port, publishing not needed",
        container({"discovery.service": "web"}, published={}),
        {"internal": True},
        [("web", 80, "203.0.113.5", 80)],
    ),
    (
        "internal: first network's IP when IPAddress is empty",
        container(
            {"discovery.service": "web"},
            ip="",
            networks={"a": {"IPAddress": ""}, "b": {"IPAddress": "198.51.100.3"}},
        ),
        {"internal": True},
        [("web", 80, "198.51.100.3", 80)],
    ),
    (
        "per-port services, sorted by port",
        container(
            {"discovery.8080.service": "admin", "discovery.80.service": "web"},
            exposed=("80/tcp", "8080/tcp"),
            published={"80/tcp": "1080", "8080/tcp": "18080"},
        ),
        {},
        [("web", 80, "127.0.0.1", 1080), ("admin", 8080, "127.0.0.1", 18080)],
    ),
    (
        "container-wide with explicit port plus a per-port service",
        container(
            {
                "discovery.service": "web",
                "discovery.port": "80",
                "discovery.9000.service": "metrics",
            },
            exposed=("80/tcp", "9000/tcp"),
            published={"80/tcp": "1080", "9000/tcp": "19000"},
        ),
        {},
        [("web", 80, "127.0.0.1", 1080), ("metrics", 9000, "127.0.0.1", 19000)],
    ),
    (
        "container-wide without port is redundant next to per-port services",
        container(
            {"discovery.service": "web", "discovery.80.service": "www"},
            exposed=("80/tcp", "443/tcp"),
        ),
        {},
        [("www", 80, "127.0.0.1", 32768)],
    ),
    (
        "per-port name wins on the container-wide port",
        container({"discovery.service": "web", "discovery.80.service": "www"}),
        {},
        [("www", 80, "127.0.0.1", 32768)],
    ),
    (
        "per-port ignore skips one port",
        container(
            {
                "discovery.80.service": "web",
                "discovery.81.service": "dbg",
                "discovery.81.ignore": "true",
            },
            exposed=("80/tcp", "81/tcp"),
        ),
        {},
        [("web", 80, "127.0.0.1", 32768)],
    ),
    (
        "tcp kept when the same port is also udp",
        container(
            {"discovery.service": "dns"}, exposed=("53/tcp", "53/udp"), published={"53/tcp": "5353"}
        ),
        {},
        [("dns", 53, "127.0.0.1", 5353)],
    ),
    (
        "udp ports do not count when inferring the port",
        container({"discovery.service": "web"}, exposed=("80/tcp", "53/udp")),
        {},
        [("web", 80, "127.0.0.1", 32768)],
    ),
]


@pytest.mark.parametrize(
    ("attrs", "kwargs", "want"), [c[1:] for c in ADDRESSING], ids=[c[0] for c in ADDRESSING]
)
def test_addressing(attrs: dict[str, Any], kwargs: dict[str, Any], want: list[Any]) -> None:
    assert brief(parse_container(attrs, **kwargs)) == want


def test_binding_prefers_advertise_then_specific_host_ip() -> None:
    attrs = container({"discovery.service": "web"})
    attrs["NetworkSettings"]["Ports"]["80/tcp"] = [
        {"HostIp": "192.0.2.9", "HostPort": "81"},
        {"HostIp": "192.0.2.7", "HostPort": "82"},
    ]
    assert brief(parse_container(attrs, advertise="192.0.2.7")) == [("web", 80, "192.0.2.7", 82)]
    assert brief(parse_container(attrs)) == [("web", 80, "192.0.2.9", 81)]


def test_requested_binding_used_when_not_running() -> None:
    attrs = container({"discovery.service": "web"}, published={})
    del attrs["NetworkSettings"]["Ports"]
    attrs["HostConfig"]["PortBindings"] = {"80/tcp": [{"HostIp": "", "HostPort": "8000"}]}
    assert brief(parse_container(attrs)) == [("web", 80, "127.0.0.1", 8000)]


# ---- nothing asked -------------------------------------------------------------------------

NOTHING = [
    ("no labels", container()),
    (
        "unrelated labels, even hostile ones",
        container({"com.example": "x\n" * 9000, "discovery.bogus\n": "\x00"}),
    ),
    ("port but no service", container({"discovery.port": "80", "discovery.tags": "a"})),
    (
        "discovery.ignore",
        container(
            {"discovery.service": "web", "discovery.ignore": "true", "discovery.port": "nonsense"}
        ),
    ),
    ("discovery.ignore=yes", container({"discovery.service": "web", "discovery.ignore": "Yes"})),
    ("SERVICE_IGNORE env", container(env=["SERVICE_NAME=web", "SERVICE_IGNORE=1"])),
    ("SERVICE_IGNORE label", container({"SERVICE_NAME": "web", "SERVICE_IGNORE": "true"})),
    ("all ports ignored", container({"discovery.service": "web", "discovery.80.ignore": "on"})),
    ("SERVICE_80_IGNORE", container({"SERVICE_80_NAME": "web", "SERVICE_80_IGNORE": "true"})),
]


@pytest.mark.parametrize("attrs", [c[1] for c in NOTHING], ids=[c[0] for c in NOTHING])
def test_nothing_asked(attrs: dict[str, Any]) -> None:
    assert parse_container(attrs) == []


def test_discovery_ignore_false_beats_service_ignore() -> None:
    attrs = container(
        {"discovery.service": "web", "discovery.ignore": "false", "SERVICE_IGNORE": "true"}
    )
    assert brief(parse_container(attrs)) == [("web", 80, "127.0.0.1", 32768)]


def test_empty_and_missing_sections() -> None:
    assert parse_container({}) == []
    assert parse_container({"Config": None, "HostConfig": None, "NetworkSettings": None}) == []
    attrs = {"Id": CID, "Name": "/x", "Config": {"Labels": {"discovery.service": "web"}}}
    with pytest.raises(LabelError, match="exactly one TCP port"):
        parse_container(attrs)


# ---- attributes: tags, weight, meta, precedence -----------------------------------------


def one(
    labels: dict[str, str] | None = None, env: list[str] | None = None, **kw: Any
) -> ServiceSpec:
    specs = parse_container(container(labels, env), **kw)
    assert len(specs) == 1
    return specs[0]


def test_full_spec() -> None:
    spec = one(
        {
            "discovery.service": "web",
            "discovery.tags": " b, a ,,a",
            "discovery.weight": "50",
            "discovery.meta.version": "1.2.3",
            "discovery.meta.Owner_Team": "ops",
        }
    )
    assert spec == ServiceSpec(
        service="web",
        container_port=80,
        address="127.0.0.1",
        port=32768,
        tags=("a", "b"),
        weight=50,
        meta={"Owner_Team": "ops", "version": "1.2.3"},
        check=CheckSpec(type="tcp"),
    )


PRECEDENCE = [
    (
        "registrator env",
        {},
        ["SERVICE_NAME=web", "SERVICE_TAGS=x,y", "SERVICE_WEIGHT=7", "SERVICE_REGION=eu"],
        ("web", ("x", "y"), 7, {"region": "eu"}),
    ),
    (
        "registrator label beats env",
        {"SERVICE_NAME": "lbl", "SERVICE_TAGS": "l"},
        ["SERVICE_NAME=env", "SERVICE_TAGS=e"],
        ("lbl", ("l",), 100, {}),
    ),
    (
        "discovery label beats registrator",
        {"discovery.service": "ours", "SERVICE_NAME": "theirs", "discovery.meta.region": "us"},
        ["SERVICE_NAME=env", "SERVICE_REGION=eu"],
        ("ours", (), 100, {"region": "us"}),
    ),
    (
        "registrator per-port name",
        {},
        ["SERVICE_80_NAME=web", "SERVICE_80_TAGS=p", "SERVICE_TAGS=c"],
        ("web", ("p",), 100, {}),
    ),
    (
        "per-port beats container-wide",
        {
            "discovery.service": "web",
            "discovery.tags": "c",
            "discovery.80.tags": "p",
            "discovery.weight": "1",
            "discovery.80.weight": "2",
            "discovery.meta.k": "c",
            "discovery.80.meta.k": "p",
            "discovery.meta.j": "c",
        },
        [],
        ("web", ("p",), 2, {"j": "c", "k": "p"}),
    ),
    (
        "registrator id and consul check settings are not meta",
        {
            "SERVICE_NAME": "web",
            "SERVICE_ID": "x",
            "SERVICE_CHECK_HTTP": "/h",
            "SERVICE_80_CHECK_INTERVAL": "5s",
        },
        [],
        ("web", (), 100, {}),
    ),
    (
        "registrator meta keys lowercased, per-port meta",
        {},
        ["SERVICE_NAME=web", "SERVICE_Team_Name=a", "SERVICE_80_PROTO=h2", "SERVICE_IDENTITY=i"],
        ("web", (), 100, {"identity": "i", "proto": "h2", "team_name": "a"}),
    ),
    (
        "quotes and unicode survive in meta values",
        {"discovery.service": "web", "discovery.meta.q": "he said \"hi\" 'x' café ✓"},
        [],
        ("web", (), 100, {"q": "he said \"hi\" 'x' café ✓"}),
    ),
    (
        "weight bounds",
        {"discovery.service": "web", "discovery.weight": "0"},
        [],
        ("web", (), 0, {}),
    ),
    (
        "weight 256",
        {"discovery.service": "web", "discovery.weight": " 256 "},
        [],
        ("web", (), 256, {}),
    ),
    ("leading zeros in a per-port key", {"discovery.080.service": "web"}, [], ("web", (), 100, {})),
]


@pytest.mark.parametrize(
    ("labels", "env", "want"), [c[1:] for c in PRECEDENCE], ids=[c[0] for c in PRECEDENCE]
)
def test_attributes_and_precedence(labels: dict[str, str], env: list[str], want: Any) -> None:
    spec = one(labels, env)
    assert (spec.service, spec.tags, spec.weight, spec.meta) == want


# ---- checks --------------------------------------------------------------------------------

CHECKS = [
    ("default tcp", {}, None, None, CheckSpec()),
    (
        "defaults from the agent",
        {},
        None,
        CheckSpec(type="http", interval=5, params={"path": "/h"}),
        CheckSpec(type="http", interval=5, params={"path": "/h"}),
    ),
    (
        "label type drops default params, keeps timings",
        {"discovery.check": "tcp"},
        None,
        CheckSpec(type="http", interval=5, params={"path": "/h"}),
        CheckSpec(type="tcp", interval=5),
    ),
    ("docker HEALTHCHECK", {}, ["CMD", "true"], None, CheckSpec(type="docker")),
    ("HEALTHCHECK NONE", {}, ["NONE"], None, CheckSpec()),
    (
        "label beats HEALTHCHECK",
        {"discovery.check": "none"},
        ["CMD", "true"],
        None,
        CheckSpec(type="none"),
    ),
    (
        "explicit docker",
        {"discovery.check": "docker"},
        ["CMD-SHELL", "true"],
        None,
        CheckSpec(type="docker"),
    ),
    (
        "http default path",
        {"discovery.check": "http"},
        None,
        None,
        CheckSpec(type="http", params={"path": "/"}),
    ),
    (
        "http all params",
        {
            "discovery.check": "http",
            "discovery.check.path": "/health?x=1",
            "discovery.check.status": "2xx,404",
            "discovery.check.interval": "500ms",
            "discovery.check.timeout": "0.25",
            "discovery.check.rise": "3",
            "discovery.check.fall": "4",
        },
        None,
        None,
        CheckSpec(
            type="http",
            interval=0.5,
            timeout=0.25,
            rise=3,
            fall=4,
            params={"path": "/health?x=1", "status": "2xx,404"},
        ),
    ),
    (
        "durations",
        {"discovery.check.interval": "1m", "discovery.check.timeout": "2s"},
        None,
        None,
        CheckSpec(interval=60, timeout=2),
    ),
    (
        "plain seconds",
        {"discovery.check.interval": "2", "discovery.check.timeout": "1.5"},
        None,
        None,
        CheckSpec(interval=2, timeout=1.5),
    ),
    (
        "exec string split, never a shell",
        {"discovery.check": "exec", "discovery.check.command": "pg_isready -h 'a b' ; rm"},
        None,
        None,
        CheckSpec(
            type="exec", params={"command": json.dumps(["pg_isready", "-h", "a b", ";", "rm"])}
        ),
    ),
    (
        "exec JSON array",
        {"discovery.check": "exec", "discovery.check.command": '["sh", "-c", "test -f /ok"]'},
        None,
        None,
        CheckSpec(type="exec", params={"command": '["sh", "-c", "test -f /ok"]'}),
    ),
    (
        "plugin params passed through",
        {"discovery.check.db": "0", "discovery.check.x-y.z": "q"},
        None,
        None,
        CheckSpec(params={"db": "0", "x-y.z": "q"}),
    ),
    (
        "per-port check overrides",
        {
            "discovery.check": "http",
            "discovery.80.check": "tcp",
            "discovery.check.interval": "3s",
            "discovery.80.check.interval": "4s",
        },
        None,
        None,
        CheckSpec(type="tcp", interval=4, params={}),
    ),
]


@pytest.mark.parametrize(
    ("labels", "healthcheck", "defaults", "want"),
    [c[1:] for c in CHECKS],
    ids=[c[0] for c in CHECKS],
)
def test_checks(
    labels: dict[str, str],
    healthcheck: list[str] | None,
    defaults: CheckSpec | None,
    want: CheckSpec,
) -> None:
    attrs = container({"discovery.service": "web", **labels}, healthcheck=healthcheck)
    assert parse_container(attrs, defaults=defaults)[0].check == want


def test_plugin_check_type(monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = container({"discovery.service": "web", "discovery.check": "redis"})
    with pytest.raises(LabelError, match="unknown check type 'redis'"):
        parse_container(attrs)
    monkeypatch.setattr(checks, "_plugins", lambda: {"redis": object()})
    assert parse_container(attrs)[0].check.type == "redis"


def test_builtin_check_types_are_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "_plugins", dict)  # no plugin installed
    assert checks.CHECK_TYPES() == {"tcp", "http", "exec", "none", "docker"}


# ---- errors --------------------------------------------------------------------------------

HOSTILE = [
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\x1b[31mb",
    "a\u2028b",
    "a\u2029b",
    "a\x85b",
    "a\x7fb",
    "a\tb",
    "x" * 10_000,
]

BAD: list[tuple[str, dict[str, str], list[str], dict[str, Any], str, str]] = [
    # (id, labels, env, container kwargs, culprit suffix, reason fragment)
    (
        "non-numeric port",
        {"discovery.service": "web", "discovery.port": "http"},
        [],
        {},
        "label discovery.port",
        "not a number",
    ),
    (
        "port 0",
        {"discovery.service": "web", "discovery.port": "0"},
        [],
        {},
        "label discovery.port",
        "not in 1..65535",
    ),
    (
        "port too big",
        {"discovery.service": "web", "discovery.port": "65536"},
        [],
        {},
        "label discovery.port",
        "not in 1..65535",
    ),
    (
        "superscript digit port",
        {"discovery.service": "web", "discovery.port": "²"},
        [],
        {},
        "label discovery.port",
        "not a number",
    ),
    (
        "unexposed port",
        {"discovery.service": "web", "discovery.port": "81"},
        [],
        {},
        "label discovery.port",
        "81/tcp is neither exposed nor published",
    ),
    (
        "udp port",
        {"discovery.service": "dns", "discovery.port": "53"},
        [],
        {"exposed": ("53/udp",), "published": {}},
        "label discovery.port",
        "UDP only",
    ),
    (
        "udp-only container",
        {"discovery.service": "dns"},
        [],
        {"exposed": ("53/udp",), "published": {}},
        "label discovery.port",
        "exactly one TCP port (none)",
    ),
    (
        "no ports",
        {"discovery.service": "web"},
        [],
        {"exposed": (), "published": {}},
        "label discovery.port",
        "exactly one TCP port",
    ),
    (
        "ambiguous ports",
        {"discovery.service": "web"},
        [],
        {"exposed": ("80/tcp", "443/tcp")},
        "label discovery.port",
        "(80/tcp, 443/tcp)",
    ),
    (
        "not published",
        {"discovery.service": "web"},
        [],
        {"published": {}},
        "label discovery.port",
        "not published",
    ),
    (
        "per-port not published",
        {"discovery.81.service": "web"},
        [],
        {"exposed": ("80/tcp", "81/tcp")},
        "label discovery.81.service",
        "81/tcp is not published",
    ),
    (
        "registrator per-port unexposed",
        {},
        ["SERVICE_81_NAME=web"],
        {},
        "env SERVICE_81_NAME",
        "neither exposed nor published",
    ),
    (
        "internal without IP",
        {"discovery.service": "web"},
        [],
        {"ip": ""},
        "label discovery.port",
        "no IP address",
    ),
    (
        "per-port key port out of range",
        {"discovery.70000.service": "web"},
        [],
        {},
        "label discovery.70000.service",
        "not in 1..65535",
    ),
    (
        "unknown check type",
        {"discovery.service": "web", "discovery.check": "ping"},
        [],
        {},
        "label discovery.check",
        "unknown check type 'ping'",
    ),
    (
        "docker check without HEALTHCHECK",
        {"discovery.service": "web", "discovery.check": "docker"},
        [],
        {},
        "label discovery.check",
        "no HEALTHCHECK",
    ),
    (
        "upper-case service",
        {"discovery.service": "Web"},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "underscore service",
        {"discovery.service": "my_web"},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "dotted service",
        {"discovery.service": "web.app"},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "leading dash",
        {"discovery.service": "-web"},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "64 chars",
        {"discovery.service": "a" * 64},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "quote in service",
        {"discovery.service": 'web"'},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "empty service",
        {"discovery.service": ""},
        [],
        {},
        "label discovery.service",
        "not a DNS label",
    ),
    (
        "registrator env name",
        {},
        ["SERVICE_NAME=My_App"],
        {},
        "env SERVICE_NAME",
        "not a DNS label",
    ),
    (
        "bad tag",
        {"discovery.service": "web", "discovery.tags": "ok,not ok"},
        [],
        {},
        "label discovery.tags",
        "not a DNS label",
    ),
    (
        "too many tags",
        {"discovery.service": "web", "discovery.tags": ",".join(f"t{i}" for i in range(33))},
        [],
        {},
        "label discovery.tags",
        "too many tags",
    ),
    (
        "weight 257",
        {"discovery.service": "web", "discovery.weight": "257"},
        [],
        {},
        "label discovery.weight",
        "not in 0..256",
    ),
    (
        "weight negative",
        {"discovery.service": "web", "discovery.weight": "-1"},
        [],
        {},
        "label discovery.weight",
        "not a number",
    ),
    (
        "registrator weight",
        {},
        ["SERVICE_NAME=web", "SERVICE_WEIGHT=heavy"],
        {},
        "env SERVICE_WEIGHT",
        "not a number",
    ),
    (
        "bad meta key",
        {"discovery.service": "web", "discovery.meta.a b": "x"},
        [],
        {},
        "label discovery.meta.a b",
        "meta key",
    ),
    (
        "unicode meta key",
        {"discovery.service": "web", "discovery.meta.ключ": "x"},
        [],
        {},
        "label discovery.meta.ключ",
        "meta key",
    ),
    (
        "registrator meta key",
        {},
        ["SERVICE_NAME=web", "SERVICE_A:B=x"],
        {},
        "env SERVICE_A:B",
        "meta key",
    ),
    (
        "too many meta",
        {"discovery.service": "web", **{f"discovery.meta.k{i}": "v" for i in range(65)}},
        [],
        {},
        f"{WHO} meta",
        "too many meta keys",
    ),
    (
        "typo label",
        {"discovery.service": "web", "discovery.servce": "x"},
        [],
        {},
        "label discovery.servce",
        "unknown label",
    ),
    (
        "port per port",
        {"discovery.service": "web", "discovery.80.port": "81"},
        [],
        {},
        "label discovery.80.port",
        "unknown label",
    ),
    (
        "bare per-port key",
        {"discovery.service": "web", "discovery.80": "x"},
        [],
        {},
        "label discovery.80",
        "unknown label",
    ),
    (
        "meta without key",
        {"discovery.service": "web", "discovery.meta": "x"},
        [],
        {},
        "label discovery.meta",
        "unknown label",
    ),
    (
        "bad ignore",
        {"discovery.service": "web", "discovery.ignore": "maybe"},
        [],
        {},
        "label discovery.ignore",
        "not true or false",
    ),
    (
        "bad duration",
        {"discovery.service": "web", "discovery.check.interval": "2 weeks"},
        [],
        {},
        "label discovery.check.interval",
        "not a duration",
    ),
    (
        "zero interval",
        {"discovery.service": "web", "discovery.check.interval": "0"},
        [],
        {},
        "label discovery.check.interval",
        "between 50ms and 1m",
    ),
    (
        "huge timeout",
        {"discovery.service": "web", "discovery.check.timeout": "2h"},
        [],
        {},
        "label discovery.check.timeout",
        "between 50ms and 1m",
    ),
    (
        "nan interval",
        {"discovery.service": "web", "discovery.check.interval": "nan"},
        [],
        {},
        "label discovery.check.interval",
        "not a duration",
    ),
    (
        "exponent interval",
        {"discovery.service": "web", "discovery.check.interval": "1e9"},
        [],
        {},
        "label discovery.check.interval",
        "not a duration",
    ),
    (
        "per-port bad timeout",
        {"discovery.service": "web", "discovery.80.check.timeout": "-1"},
        [],
        {},
        "label discovery.80.check.timeout",
        "not a duration",
    ),
    (
        "rise 0",
        {"discovery.service": "web", "discovery.check.rise": "0"},
        [],
        {},
        "label discovery.check.rise",
        "1..100",
    ),
    (
        "fall text",
        {"discovery.service": "web", "discovery.check.fall": "two"},
        [],
        {},
        "label discovery.check.fall",
        "1..100",
    ),
    (
        "exec without command",
        {"discovery.service": "web", "discovery.check": "exec"},
        [],
        {},
        "label discovery.check",
        "needs a command",
    ),
    (
        "exec bad JSON",
        {
            "discovery.service": "web",
            "discovery.check": "exec",
            "discovery.check.command": '["true"',
        },
        [],
        {},
        "label discovery.check.command",
        "not a JSON array",
    ),
    (
        "exec JSON non-strings",
        {
            "discovery.service": "web",
            "discovery.check": "exec",
            "discovery.check.command": "[1, 2]",
        },
        [],
        {},
        "label discovery.check.command",
        "array of strings",
    ),
    (
        "exec unbalanced quote",
        {
            "discovery.service": "web",
            "discovery.check": "exec",
            "discovery.check.command": 'sh -c "x',
        },
        [],
        {},
        "label discovery.check.command",
        "cannot be split",
    ),
    (
        "exec newline smuggled through JSON",
        {
            "discovery.service": "web",
            "discovery.check": "exec",
            "discovery.check.command": '["sh","-c","a\\nb"]',
        },
        [],
        {},
        "label discovery.check.command",
        "control character 0x0a",
    ),
    (
        "http path without slash",
        {"discovery.service": "web", "discovery.check": "http", "discovery.check.path": "health"},
        [],
        {},
        "label discovery.check.path",
        "must start with /",
    ),
    (
        "http path with space",
        {"discovery.service": "web", "discovery.check": "http", "discovery.check.path": "/a b"},
        [],
        {},
        "label discovery.check.path",
        "must start with /",
    ),
    (
        "http status",
        {"discovery.service": "web", "discovery.check": "http", "discovery.check.status": "ok"},
        [],
        {},
        "label discovery.check.status",
        "not a code like 200",
    ),
    (
        "http status 600",
        {"discovery.service": "web", "discovery.check": "http", "discovery.check.status": "600"},
        [],
        {},
        "label discovery.check.status",
        "not a code like 200",
    ),
    (
        "bad check param key",
        {"discovery.service": "web", "discovery.check.a/b": "x"},
        [],
        {},
        "label discovery.check.a/b",
        "meta key",
    ),
]


@pytest.mark.parametrize(
    ("labels", "env", "kw", "culprit", "reason"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_bad(
    labels: dict[str, str], env: list[str], kw: dict[str, Any], culprit: str, reason: str
) -> None:
    internal = kw.get("ip") == ""
    with pytest.raises(LabelError) as info:
        parse_container(container(labels, env, **kw), internal=internal)
    assert info.value.culprit == culprit if culprit.startswith(WHO) else f"{WHO} {culprit}"
    assert reason in info.value.reason


def test_culprit_format() -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container({"discovery.service": "web", "discovery.port": "x"}))
    assert str(info.value).startswith("container web-1 (3f2a3f2a3f2a) label discovery.port: ")


FIELDS = [
    "discovery.service",
    "discovery.port",
    "discovery.tags",
    "discovery.weight",
    "discovery.meta.k",
    "discovery.check",
    "discovery.check.path",
    "discovery.check.x",
    "discovery.80.service",
    "discovery.80.tags",
    "discovery.ignore",
    "SERVICE_NAME",
    "SERVICE_TAGS",
    "SERVICE_REGION",
    "SERVICE_80_NAME",
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:12]))
@pytest.mark.parametrize("key", FIELDS)
def test_hostile_values_rejected(key: str, value: str) -> None:
    labels = {"discovery.service": "web", key: value}
    with pytest.raises(LabelError) as info:
        parse_container(container(labels))
    assert info.value.culprit == f"{WHO} label {key}"
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("value", [*HOSTILE[:4], "y" * 10000], ids=lambda v: repr(v[:12]))
def test_hostile_env_rejected(value: str) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container(env=["SERVICE_NAME=web", f"SERVICE_OWNER={value}"]))
    assert info.value.culprit == f"{WHO} env SERVICE_OWNER"


@pytest.mark.parametrize(
    "key",
    [
        "discovery.meta.a\nb",
        "discovery.meta." + "k" * 10_000,
        "discovery.\u2028service",
        "SERVICE_\x00X",
    ],
)
def test_hostile_keys_rejected(key: str) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container({"discovery.service": "web", key: "v"}))
    assert "\n" not in str(info.value) and "\u2028" not in str(info.value)
    assert len(str(info.value)) < 400


def test_hostile_container_name_is_escaped() -> None:
    attrs = container({"discovery.service": "web", "discovery.port": "x"})
    attrs["Name"] = "/evil\nname" + "z" * 500
    with pytest.raises(LabelError) as info:
        parse_container(attrs)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_bad_advertise_address() -> None:
    for bad in ("myhost", "host\nname", "300.1.1.1"):
        with pytest.raises(ValidationError, match="advertise address"):
            parse_container(container({"discovery.service": "web"}), advertise=bad)


# ---- property: never anything but specs or a LabelError --------------------------------

KEYS = st.sampled_from(
    [
        *FIELDS,
        "discovery.80.weight",
        "discovery.80.check",
        "discovery.80.ignore",
        "discovery.check.interval",
        "discovery.check.status",
        "discovery.check.command",
        "SERVICE_80_TAGS",
        "SERVICE_IGNORE",
    ]
)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "web",
            "80",
            "81",
            "http",
            "exec",
            "tcp",
            "none",
            "docker",
            "true",
            "false",
            "2xx",
            "/h",
            "a,b",
            "2s",
            '["true"]',
            "1",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    labels=st.dictionaries(KEYS, VALUES, max_size=6),
    internal=st.booleans(),
    network=st.sampled_from(["bridge", "host"]),
)
def test_fuzz_specs_or_label_error(labels: dict[str, str], internal: bool, network: str) -> None:
    attrs = container(labels, exposed=("80/tcp", "81/tcp", "53/udp"), network=network)
    try:
        specs = parse_container(attrs, internal=internal)
    except LabelError as exc:
        assert exc.culprit.startswith(WHO)
        return
    for spec in specs:  # everything that survives makes a valid registry record
        Instance(
            service=spec.service,
            id=make_instance_id("node1", CID, spec.container_port),
            node="node1",
            address=spec.address,
            port=spec.port,
            tags=spec.tags,
            weight=spec.weight,
            meta=spec.meta,
            container_id=CID,
        )


def test_meta_key_trailing_newline_rejected_here() -> None:
    # validate.meta alone lets "k\n" through (see test_validate); labels check whole keys
    with pytest.raises(LabelError, match="control character"):
        parse_container(container({"discovery.service": "web", "discovery.meta.k\n": "v"}))


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
