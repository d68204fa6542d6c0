"""discovery.agent.labels: container inspect dict -> ServiceSpecs, or a LabelError."""

from __future__ import annotations

from typing import Any

import pytest

from discovery.agent.labels import parse_container
from discovery.agent.spec import CheckSpec, ServiceSpec
from discovery.errors import LabelError

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
        "internal: an IPv4 address first, then a global IPv6 one",
        container(
            {"discovery.service": "web"},
            ip="",
            networks={"a": {"IPAddress": "", "GlobalIPv6Address": "2001:db8::5"},
                      "b": {"IPAddress": "198.51.100.3"}},
        ),
        {"internal": True},
        [("web", 80, "198.51.100.3", 80)],
    ),
    (
        "internal: IPv6 only",
        container(
            {"discovery.service": "web"},
            ip="",
            networks={"v6": {"IPAddress": "", "GlobalIPv6Address": "2001:db8:0:0::5"}},
        ),
        {"internal": True},
        [("web", 80, "2001:db8::5", 80)],
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


def test_a_port_published_on_loopback_only_is_not_offered_to_other_hosts() -> None:
    """Published on 127.0.0.1 alone, a host advertising 192.0.2.7 would register
    127.0.0.1:81, and every other host would send that traffic to its own loopback."""
    attrs = container({"discovery.service": "web"})
    attrs["NetworkSettings"]["Ports"]["80/tcp"] = [{"HostIp": "127.0.0.1", "HostPort": "81"}]
    with pytest.raises(LabelError, match=r"published on 127\.0\.0\.1 only: other hosts cannot"):
        parse_container(attrs, advertise="192.0.2.7")
    # a host whose advertised address is loopback too (one machine, a test): as it is
    assert brief(parse_container(attrs, advertise="127.0.0.1")) == [("web", 80, "127.0.0.1", 81)]


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
