"""discovery.agent.labels: a bad label -> a LabelError naming the container and the label."""

from __future__ import annotations

from typing import Any

import pytest

from discovery.agent.labels import parse_container
from discovery.errors import LabelError
from tests.unit.test_labels import WHO, container
from tests.unit.test_labels_checks import BAD_CHECKS, BadRow

# ---- errors --------------------------------------------------------------------------------

BAD: list[BadRow] = [
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
    *BAD_CHECKS,  # the rows for the check labels, in test_labels_checks
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


@pytest.mark.parametrize(("labels", "env", "ignored", "meta", "port"), [
    ({"discovery.service": "web", "SERVICE_REGION": "eu", "SERVICE_Region": "us"}, [],
     "label SERVICE_Region", {"region": "eu"}, 80),
    ({"discovery.service": "web"}, ["SERVICE_region=us", "SERVICE_REGION=eu"],
     "env SERVICE_region", {"region": "eu"}, 80),
    ({"discovery.80.service": "web", "discovery.080.service": "api"}, [],
     "label discovery.80.service", {}, 80),
])
def test_two_keys_of_one_source_that_mean_the_same_are_one_with_a_warning_naming_both(
        caplog: pytest.LogCaptureFixture, labels: dict[str, str], env: list[str],
        ignored: str, meta: dict[str, str], port: int) -> None:
    """They were folded into one without a word, the value of whichever Docker listed last
    kept: now the first in order is, whatever the order Docker lists them in, and a warning
    names both (refusing the container would take it out of every host at the upgrade)."""
    [spec] = parse_container(container(labels, env=env))
    assert dict(spec.meta) == meta and spec.container_port == port
    assert spec.service == ("api" if "discovery.080.service" in labels else "web")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{WHO} {ignored}: ignored: means the same as" in warning


def test_a_later_source_still_overrides_an_earlier_one() -> None:
    [spec] = parse_container(container({"discovery.service": "web", "SERVICE_REGION": "eu",
                                        "discovery.meta.region": "us"}, env=["SERVICE_REGION=x"]))
    assert spec.meta["region"] == "us"
