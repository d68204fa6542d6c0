"""discovery.hooks: the @check decorator, result normalisation, timeouts, entry-point loading,
rise/fall through the real CheckRunner, and the example plugin's ``httpbody`` check."""

from __future__ import annotations

import http.server
import importlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery import hooks
from discovery.agent.checks import CHECK_TYPES, build_check, load_check_factory
from discovery.agent.health import CheckRunner, CheckScheduler
from discovery.hooks import (
    Check,
    CheckError,
    CheckResult,
    CheckSpec,
    CheckTarget,
    FunctionCheck,
    check,
    outcome,
)
from tests.harness.util import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "examples" / "check-plugin"
TARGET = CheckTarget("127.0.0.1", 1, "c0ffee" * 10)


def run(factory: Any, params: dict[str, str] | None = None, timeout: float = 1.0) -> CheckResult:
    result: CheckResult = factory(CheckSpec(type="t", timeout=timeout, params=params or {}),
                                  TARGET).run()
    return result


# ---- the decorator ------------------------------------------------------------------------


def test_decorator_makes_a_factory() -> None:
    @check("always")
    def always(spec: CheckSpec, target: CheckTarget) -> bool:
        """Always fine."""
        return True

    assert isinstance(always, FunctionCheck)
    assert always.name == "always" and always.__doc__ == "Always fine."
    assert always.func(CheckSpec(), TARGET) is True  # the plain function stays reachable
    built = always(CheckSpec(), TARGET)
    assert callable(built.run)
    assert built.run() == CheckResult(True, "ok")
    assert "always" in repr(always) and "127.0.0.1:1" in repr(built)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (True, CheckResult(True, "ok")),
        (False, CheckResult(False, "failed")),
        ((True, "fine"), CheckResult(True, "fine")),
        ((False, "line1\nline2\x1b[0m"), CheckResult(False, "line1 line2 [0m")),
        (CheckResult(True, "x" * 500), CheckResult(True, "x" * 197 + "...")),
        (None, CheckResult(False, "t check returned NoneType, not bool, (bool, str) or "
                                  "CheckResult")),
        (1, CheckResult(False, "t check returned int, not bool, (bool, str) or CheckResult")),
        (("yes", "x"), CheckResult(False, "t check returned tuple, not bool, (bool, str) or "
                                          "CheckResult")),
    ],
)
def test_outcome(value: object, want: CheckResult) -> None:
    assert outcome(value, "t") == want

    @check("t")
    def returns(spec: CheckSpec, target: CheckTarget) -> Any:
        return value

    assert run(returns) == want


def test_exception_is_a_failure() -> None:
    @check("boom")
    def boom(spec: CheckSpec, target: CheckTarget) -> bool:
        raise ConnectionRefusedError("nobody home")

    assert run(boom) == CheckResult(False, "boom check raised ConnectionRefusedError: nobody home")


def test_function_sees_spec_and_target() -> None:
    seen: list[tuple[CheckSpec, CheckTarget]] = []

    @check("spy")
    def spy(spec: CheckSpec, target: CheckTarget) -> bool:
        seen.append((spec, target))
        return True

    spec = CheckSpec(type="spy", interval=3, timeout=2, rise=4, fall=5, params={"a": "b"})
    spy(spec, TARGET).run()
    assert seen == [(spec, TARGET)]


def test_required_params() -> None:
    @check("needs", required=("contains", "path"))
    def needs(spec: CheckSpec, target: CheckTarget) -> bool:
        return spec.params["contains"] == "x"

    with pytest.raises(CheckError, match=r"needs check needs discovery\.check\.contains, "
                                         r"discovery\.check\.path"):
        needs(CheckSpec(params={}), TARGET)
    with pytest.raises(CheckError, match=r"discovery\.check\.path$"):
        needs(CheckSpec(params={"contains": "x", "path": "  "}), TARGET)
    assert run(needs, {"contains": "x", "path": "/"}).ok
    # build_check (what the agent uses) passes the CheckError through untouched
    with pytest.raises(CheckError, match="needs check needs"):
        build_check_with(needs, CheckSpec(type="needs"))


def build_check_with(factory: Any, spec: CheckSpec) -> Check:
    from discovery.agent import checks

    saved = checks.BUILTIN_CHECKS.copy()
    checks.BUILTIN_CHECKS[spec.type] = factory
    try:
        return build_check(spec, TARGET)
    finally:
        checks.BUILTIN_CHECKS.clear()
        checks.BUILTIN_CHECKS.update(saved)


def test_required_accepts_a_single_string() -> None:
    @check("one", required="contains")
    def one(spec: CheckSpec, target: CheckTarget) -> bool:
        return True

    assert one.required == ("contains",)


@pytest.mark.parametrize("name", ["", "has space", "-dash", "x" * 65, "semi;colon", "ä"])
def test_bad_names(name: str) -> None:
    with pytest.raises(CheckError, match="check name"):
        check(name)


def test_decorator_without_a_name() -> None:
    def probe(spec: CheckSpec, target: CheckTarget) -> bool:
        return True

    with pytest.raises(CheckError, match="needs the name"):
        check(probe)  # type: ignore[arg-type]  # @check instead of @check("probe")


def test_bad_required_and_target() -> None:
    with pytest.raises(CheckError, match="required parameter names"):
        check("x", required=("",))
    with pytest.raises(CheckError, match="must decorate a function"):
        check("x")(42)  # type: ignore[arg-type]


# ---- deadlines ----------------------------------------------------------------------------


def test_timeout_and_no_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "GRACE", 0.05)
    release = threading.Event()
    calls: list[int] = []

    @check("hang")
    def hang(spec: CheckSpec, target: CheckTarget) -> bool:
        calls.append(1)
        release.wait(10)
        return True

    probe = hang(CheckSpec(timeout=0.1), TARGET)
    started = time.monotonic()
    assert probe.run() == CheckResult(False, "hang check timed out after 0.1s")
    assert time.monotonic() - started < 1.0
    # still hung: fail at once, without another thread
    assert probe.run() == CheckResult(False, "hang check still running from an earlier run")
    assert len(calls) == 1
    release.set()
    wait_for(lambda: not any(t.name.startswith("check-hang") for t in threading.enumerate()),
             timeout=5, message="the hung call to end")
    assert probe.run() == CheckResult(True, "ok")
    assert len(calls) == 2


# ---- the agent's side: rise/fall and entry points -----------------------------------------


def test_rise_fall_with_the_real_runner(check_scheduler: CheckScheduler) -> None:
    state = {"ok": True}

    @check("flag")
    def flag(spec: CheckSpec, target: CheckTarget) -> tuple[bool, str]:
        return state["ok"], "up" if state["ok"] else "down"

    spec = CheckSpec(type="flag", interval=0.05, timeout=0.5, rise=3, fall=2)
    transitions: list[tuple[bool, CheckResult, int]] = []
    runner = CheckRunner(spec, flag(spec, TARGET), name="flag", scheduler=check_scheduler,
                         on_transition=lambda ok, res: transitions.append((ok, res, runner.runs)))
    runner.start()
    try:
        wait_for(lambda: transitions, timeout=5, message="healthy")
        assert transitions[0] == (True, CheckResult(True, "up"), 3)  # rise = 3 runs
        state["ok"] = False
        wait_for(lambda: len(transitions) == 2, timeout=5, message="unhealthy")
        ok, result, runs = transitions[1]
        assert not ok and result == CheckResult(False, "down")
        assert runs >= 5  # at least fall = 2 failing runs after the 3 good ones
    finally:
        runner.stop()


def _fake_distribution(root: Path, name: str, module: str, body: str) -> None:
    """What ``pip install`` leaves behind: a module and a .dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(body)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[discovery.checks]\n{name} = {module}:probe\n")


def test_loaded_through_the_entry_point_group(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path, "hookedtest", "hooked_test_plugin", (
        "from discovery.hooks import check\n"
        "@check('hookedtest', required=('word',))\n"
        "def probe(spec, target):\n"
        "    return spec.params['word'] == 'yes', 'word is ' + spec.params['word']\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert "hookedtest" in CHECK_TYPES()
        factory = load_check_factory("hookedtest")
        assert isinstance(factory, FunctionCheck) and factory.name == "hookedtest"
        good = build_check(CheckSpec(type="hookedtest", params={"word": "yes"}), TARGET)
        assert good.run() == CheckResult(True, "word is yes")
        with pytest.raises(CheckError, match=r"discovery\.check\.word"):
            build_check(CheckSpec(type="hookedtest"), TARGET)
    finally:
        sys.modules.pop("hooked_test_plugin", None)


# ---- the example plugin (examples/check-plugin), against a real HTTP server ---------------


class _Body(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b"ok\n"

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(type(self).body)))
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[int, type[_Body]]]:
    handler = type("Handler", (_Body,), {})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield int(srv.server_address[1]), handler
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def httpbody(monkeypatch: pytest.MonkeyPatch) -> Iterator[FunctionCheck]:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    module = importlib.import_module("discovery_check_example")
    try:
        yield module.httpbody
    finally:
        sys.modules.pop("discovery_check_example", None)


def test_example_httpbody(httpbody: FunctionCheck, server: tuple[int, type[_Body]]) -> None:
    port, handler = server
    target = CheckTarget("127.0.0.1", port, "c0ffee" * 10)

    def probe(**params: str) -> CheckResult:
        return httpbody(CheckSpec(type="httpbody", timeout=2, params=params), target).run()

    assert probe(contains="ok", path="/health") == CheckResult(
        True, "GET /health: HTTP 200, body has 'ok'")
    handler.body = b"degraded\n"
    assert probe(contains="ok") == CheckResult(False, "GET /: HTTP 200, body lacks 'ok'")
    handler.status, handler.body = 503, b"ok"
    assert probe(contains="ok") == CheckResult(False, "GET /: HTTP 503")
    assert not probe(contains="ok", path="no-slash").ok
    with pytest.raises(CheckError, match=r"discovery\.check\.contains"):
        httpbody(CheckSpec(type="httpbody"), target)
    closed = CheckTarget("127.0.0.1", 1, "c0ffee" * 10)
    result = httpbody(CheckSpec(type="httpbody", params={"contains": "x"}), closed).run()
    assert not result.ok and "ConnectionRefusedError" in result.output
