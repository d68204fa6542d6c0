"""discovery.agent.labels: the check labels -> CheckSpec, and the errors in them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from discovery.agent import checks
from discovery.agent.labels import parse_container
from discovery.agent.spec import CheckSpec
from discovery.errors import LabelError
from tests.unit.test_labels import container

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



# ---- errors in the check labels: the last rows of BAD in test_labels_errors ----------

# a row: (id, labels, env, container kwargs, culprit suffix, reason fragment)
BadRow = tuple[str, dict[str, str], list[str], dict[str, Any], str, str]

BAD_CHECKS: tuple[BadRow, ...] = (
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
        "http path not ASCII",  # http.client could not send it: every run would fail
        {"discovery.service": "web", "discovery.check": "http",
         "discovery.check.path": "/health/\u00e9"},
        [],
        {},
        "label discovery.check.path",
        "printable ASCII",
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
)
