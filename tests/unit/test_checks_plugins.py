"""discovery.agent.checks: the check factories, plugins and the output clip."""

from __future__ import annotations

from typing import Any

import pytest

from discovery.agent import checks
from discovery.agent.checks import (
    CHECK_TYPES,
    DockerCheck,
    ExecCheck,
    HttpCheck,
    NoneCheck,
    TcpCheck,
    build_check,
    clip,
    load_check_factory,
)
from discovery.agent.spec import CheckSpec, CheckTarget
from discovery.errors import CheckError
from tests.unit.test_checks import target

# ---- factories and plugins ----------------------------------------------------------------


def test_builtin_factories() -> None:
    for name, cls in [
        ("tcp", TcpCheck),
        ("http", HttpCheck),
        ("exec", ExecCheck),
        ("none", NoneCheck),
        ("docker", DockerCheck),
    ]:
        assert load_check_factory(name) is cls
    assert {"tcp", "http", "exec", "none", "docker"} <= CHECK_TYPES()


BUILTINS = {"tcp": TcpCheck, "http": HttpCheck, "exec": ExecCheck, "none": NoneCheck,
            "docker": DockerCheck}


def test_builtins_resolve_without_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not set(BUILTINS) & set(checks._plugins())  # discovery publishes none of its own
    monkeypatch.setattr(checks, "entry_points", lambda group: [])  # no metadata installed
    assert CHECK_TYPES() == set(BUILTINS)
    assert all(load_check_factory(name) is cls for name, cls in BUILTINS.items())


def test_a_plugin_cannot_replace_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "_plugins", lambda: {"http": FakeEntryPoint(redis_check)})
    assert load_check_factory("http") is HttpCheck


class FakeEntryPoint:
    def __init__(self, obj: Any = None, error: Exception | None = None) -> None:
        self.obj, self.error, self.value = obj, error, "pkg.mod:obj"

    def load(self) -> Any:
        if self.error:
            raise self.error
        return self.obj


def redis_check(spec: CheckSpec, target: CheckTarget) -> NoneCheck:
    return NoneCheck(spec, target)


def test_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        checks,
        "_plugins",
        lambda: {
            "redis": FakeEntryPoint(redis_check),
            "broken": FakeEntryPoint(error=ImportError("no module named pkg")),
            "notcallable": FakeEntryPoint(42),
        },
    )
    assert {"redis", "broken", "tcp"} <= CHECK_TYPES()
    assert load_check_factory("redis") is redis_check
    assert build_check(CheckSpec(type="redis"), target(1)).run().ok
    with pytest.raises(CheckError, match="fails to load: no module named pkg"):
        load_check_factory("broken")
    with pytest.raises(CheckError, match="not callable"):
        load_check_factory("notcallable")
    with pytest.raises(CheckError, match=r"unknown check type 'ping' \(known: .*redis"):
        load_check_factory("ping")


def test_build_check_wraps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(spec: CheckSpec, target: CheckTarget) -> NoneCheck:
        raise KeyError("host")

    monkeypatch.setattr(checks, "_plugins", lambda: {"bad": FakeEntryPoint(bad)})
    with pytest.raises(CheckError, match="cannot build bad check: KeyError"):
        build_check(CheckSpec(type="bad"), target(1))
    with pytest.raises(CheckError, match="HTTP path"):
        build_check(CheckSpec(type="http", params={"path": "x"}), target(1))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("plain", "plain"),
        ("a\nb\r\nc\td", "a b c d"),
        ("\x1b[31mred\x00", "[31mred"),
        ("line\u2028sep\x85", "line sep"),
        ("x" * 500, "x" * 197 + "..."),
    ],
)
def test_clip(text: str, want: str) -> None:
    assert clip(text) == want
