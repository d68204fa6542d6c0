"""discovery.agent.checks and discovery.agent.health: probes, plugins, rise/fall, the runner."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
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
    parse_command,
    status_matcher,
)
from discovery.agent.health import CheckRunner, CheckScheduler, Hysteresis, run_check
from discovery.agent.spec import PER_CONTAINER_CHECKS, CheckResult, CheckSpec, CheckTarget
from discovery.errors import CheckError
from tests.harness.util import wait_for

# ---- a real listener on loopback ---------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path
        if path.startswith("/slow"):
            time.sleep(1.0)  # a slow endpoint (simulated work, not a wait)
        code = int(path.strip("/").split("?")[0]) if path.strip("/")[:3].isdigit() else 200
        if path.startswith("/longreason"):
            self.send_response(200, "x" * 1000 + "\x1b[31m")
        else:
            self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def target(port: int, docker: Any = None) -> CheckTarget:
    return CheckTarget("127.0.0.1", port, "c0ffee" * 10, docker)


# ---- tcp / http --------------------------------------------------------------------------


def test_tcp_ok(http_port: int) -> None:
    result = TcpCheck(CheckSpec(), target(http_port)).run()
    assert result == CheckResult(True, f"connected to 127.0.0.1:{http_port}")


def test_tcp_refused(closed_port: int) -> None:
    result = TcpCheck(CheckSpec(timeout=0.5), target(closed_port)).run()
    assert not result.ok and "ConnectionRefusedError" in result.output


HTTP = [
    ("/", None, True),
    ("/204", None, True),
    ("/302", None, True),
    ("/404", None, False),
    ("/500", None, False),
    ("/500", "5xx", True),
    ("/404", "200,404", True),
    ("/200", "200", True),
    ("/201", "200", False),
    ("/302", "2xx", False),
    ("/health?x=1", "2xx", True),
]


@pytest.mark.parametrize(("path", "status", "ok"), HTTP)
def test_http_status(http_port: int, path: str, status: str | None, ok: bool) -> None:
    params = {"path": path, **({"status": status} if status else {})}
    result = HttpCheck(CheckSpec(type="http", params=params), target(http_port)).run()
    assert result.ok is ok
    assert result.output.startswith(f"HTTP {path.strip('/')[:3] if path[1:4].isdigit() else 200}")


def test_http_default_path(http_port: int) -> None:
    assert HttpCheck(CheckSpec(type="http"), target(http_port)).run() == CheckResult(
        True, "HTTP 200 OK"
    )


def test_http_output_clipped(http_port: int) -> None:
    result = HttpCheck(CheckSpec(params={"path": "/longreason"}), target(http_port)).run()
    assert result.ok and len(result.output) <= checks.OUTPUT_LIMIT
    assert "\x1b" not in result.output


def test_http_timeout(http_port: int) -> None:
    started = time.monotonic()
    result = HttpCheck(CheckSpec(timeout=0.2, params={"path": "/slow"}), target(http_port)).run()
    assert not result.ok and "timed out" in result.output
    assert time.monotonic() - started < 0.9


def test_http_refused(closed_port: int) -> None:
    result = HttpCheck(CheckSpec(), target(closed_port)).run()
    assert not result.ok and "Connection refused" in result.output


def test_http_not_http(closed_port: int) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve() -> None:
            conn, _ = srv.accept()
            conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        result = HttpCheck(CheckSpec(), target(srv.getsockname()[1])).run()
    assert not result.ok and "BadStatusLine" in result.output


@pytest.mark.parametrize(
    "params",
    [
        {"path": "health"},
        {"path": "/a b"},
        {"path": "/a\nb"},
        {"status": "ok"},
        {"status": "2x"},
        {"status": "99"},
    ],
)
def test_http_misconfigured(params: dict[str, str]) -> None:
    with pytest.raises(CheckError):
        HttpCheck(CheckSpec(params=params), target(80))


STATUS = [
    (None, {200: True, 204: True, 301: True, 399: True, 400: False, 500: False, 100: False}),
    ("", {200: True, 404: False}),
    ("200", {200: True, 201: False, 302: False}),
    ("2xx", {200: True, 299: True, 300: False}),
    ("2XX, 404", {250: True, 404: True, 405: False}),
    ("503,5xx", {500: True, 200: False}),
]


@pytest.mark.parametrize(("value", "codes"), STATUS)
def test_status_matcher(value: str | None, codes: dict[int, bool]) -> None:
    match = status_matcher(value)
    assert {code: match(code) for code in codes} == codes


@pytest.mark.parametrize("value", ["ok", "600", "2x", "20", "2000", "x00", "2xx;3xx", "-200"])
def test_status_matcher_bad(value: str) -> None:
    with pytest.raises(CheckError):
        status_matcher(value)


COMMANDS = [
    ("true", ["true"]),
    ("pg_isready -U 'a b' ; rm -rf /", ["pg_isready", "-U", "a b", ";", "rm", "-rf", "/"]),
    ("echo $HOME `id` $(id)", ["echo", "$HOME", "`id`", "$(id)"]),
    ('["sh", "-c", "exit 0"]', ["sh", "-c", "exit 0"]),
    ('  ["a b"]', ["a b"]),
]


@pytest.mark.parametrize(("value", "argv"), COMMANDS)
def test_parse_command(value: str, argv: list[str]) -> None:
    assert parse_command(value) == argv


@pytest.mark.parametrize(
    "value", [None, "", "  ", "[]", '[""]', '["a"', "[1]", '[{"a": 1}]', "'unbalanced", '"']
)
def test_parse_command_bad(value: str | None) -> None:
    with pytest.raises(CheckError):
        parse_command(value)


# ---- exec / docker / none, with a fake Docker client -----------------------------------------


class FakeStream:
    def __init__(self, chunks: list[bytes], hang: bool = False) -> None:
        self.chunks, self.hang, self.closed = list(chunks), hang, threading.Event()

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.hang:
            self.closed.wait(5)
        raise StopIteration

    def close(self) -> None:
        self.closed.set()


class FakeAPI:
    def __init__(
        self,
        exit_code: int | None = 0,
        chunks: list[bytes] | None = None,
        hang: bool = False,
        fail: Exception | None = None,
        health: dict[str, Any] | None = None,
    ) -> None:
        self.exit_code, self.chunks, self.hang, self.fail = exit_code, chunks or [], hang, fail
        self.health = health
        self.calls: list[tuple[Any, ...]] = []
        self.stream: FakeStream | None = None

    def exec_create(self, container: str, cmd: list[str], **kw: Any) -> dict[str, str]:
        self.calls.append(("create", container, cmd, kw))
        if self.fail:
            raise self.fail
        return {"Id": "e1"}

    def exec_start(self, exec_id: str, **kw: Any) -> FakeStream:
        self.calls.append(("start", exec_id, kw))
        self.stream = FakeStream(self.chunks, self.hang)
        return self.stream

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        running = self.hang and self.stream is not None
        return {"Running": running, "ExitCode": None if running else self.exit_code}

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        return {"State": {"Health": self.health} if self.health else {}}


class FakeDocker:
    def __init__(self, api: FakeAPI) -> None:
        self.api = api


def exec_check(
    api: FakeAPI, command: str = '["check", "--now"]', timeout: float = 1.0
) -> ExecCheck:
    spec = CheckSpec(type="exec", timeout=timeout, params={"command": command})
    return ExecCheck(spec, target(80, FakeDocker(api)))


def test_exec_ok_runs_argv_in_the_container() -> None:
    api = FakeAPI(0, [b"all ", b"good\n"])
    assert exec_check(api).run() == CheckResult(True, "exit 0: all good")
    assert api.calls[0][:3] == ("create", "c0ffee" * 10, ["check", "--now"])


@pytest.mark.parametrize(("code", "ok"), [(0, True), (1, False), (137, False)])
def test_exec_exit_codes(code: int, ok: bool) -> None:
    assert exec_check(FakeAPI(code), "pg_isready -q").run() == CheckResult(ok, f"exit {code}")


def test_exec_timeout() -> None:
    api = FakeAPI(hang=True, chunks=[b"starting"])
    started = time.monotonic()
    result = exec_check(api, timeout=0.2).run()
    assert not result.ok and result.output.startswith("timed out after 0.2s")
    assert time.monotonic() - started < 2


def test_exec_docker_error_is_a_failure() -> None:
    result = exec_check(FakeAPI(fail=RuntimeError("409 container is paused"))).run()
    assert result == CheckResult(False, "RuntimeError: 409 container is paused")


def test_exec_output_sanitised() -> None:
    result = exec_check(FakeAPI(1, [b"\x1b[31mred\r\nline\xff" * 100])).run()
    assert not result.ok and len(result.output) <= checks.OUTPUT_LIMIT
    assert result.output.isprintable()


def test_exec_misconfigured() -> None:
    with pytest.raises(CheckError, match="needs a command"):
        ExecCheck(CheckSpec(type="exec"), target(80, FakeDocker(FakeAPI())))
    with pytest.raises(CheckError, match="Docker client"):
        ExecCheck(CheckSpec(type="exec", params={"command": "true"}), target(80))


@pytest.mark.parametrize(
    ("health", "ok", "output"),
    [
        ({"Status": "healthy", "Log": [{"Output": "fine\n"}]}, True, "docker health healthy fine"),
        ({"Status": "unhealthy", "Log": []}, False, "docker health unhealthy"),
        ({"Status": "starting"}, False, "docker health starting"),
        (None, False, "docker health none"),
    ],
)
def test_docker_check(health: dict[str, Any] | None, ok: bool, output: str) -> None:
    check = DockerCheck(CheckSpec(type="docker"), target(80, FakeDocker(FakeAPI(health=health))))
    assert check.run() == CheckResult(ok, output)


def test_docker_check_error() -> None:
    check = DockerCheck(CheckSpec(), target(80, FakeDocker(FakeAPI(fail=OSError("gone")))))
    assert check.run() == CheckResult(False, "OSError: gone")


def test_none_check() -> None:
    assert NoneCheck(CheckSpec(type="none"), target(1)).run() == CheckResult(True, "no check")


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


# ---- hysteresis ------------------------------------------------------------------------------

SEQUENCES = [
    # (rise, fall, start healthy, observations, expected returns)
    (1, 1, False, "+-+", [True, False, True]),
    (2, 3, False, "++", [None, True]),
    (2, 3, False, "+-+", [None, None, None]),
    (2, 3, False, "++---", [None, True, None, None, False]),
    (2, 3, False, "++--+---", [None, True, None, None, None, None, None, False]),
    (3, 2, True, "--", [None, False]),
    (3, 2, True, "-+-", [None, None, None]),
    (3, 2, True, "++++", [None, None, None, None]),
    (3, 2, False, "---", [None, None, None]),
    (2, 2, False, "++++--++", [None, True, None, None, None, False, None, True]),
]


@pytest.mark.parametrize(("rise", "fall", "healthy", "seq", "want"), SEQUENCES)
def test_hysteresis(rise: int, fall: int, healthy: bool, seq: str, want: list[bool | None]) -> None:
    h = Hysteresis(rise, fall, healthy)
    got = []
    state = healthy
    for c in seq:
        changed = h.observe(c == "+")
        got.append(changed)
        state = state if changed is None else changed
        assert h.healthy is state
    assert got == want


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2)])
def test_hysteresis_bounds(rise: int, fall: int) -> None:
    with pytest.raises(CheckError, match="rise and fall must be >= 1"):
        Hysteresis(rise, fall)


# ---- runner ----------------------------------------------------------------------------------


class Scripted:
    """Returns results from a script (then repeats the last); records call times."""

    def __init__(self, script: list[Any], delay: float = 0.0) -> None:
        self.script, self.delay = list(script), delay
        self.times: list[float] = []

    def run(self) -> CheckResult:
        self.times.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)  # the check's own run time (simulated work)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]


OK, BAD = CheckResult(True, "ok"), CheckResult(False, "bad")


def test_run_check_never_raises() -> None:
    assert run_check(Scripted([ValueError("x" * 500)])).output.startswith("check raised ValueError")
    assert run_check(Scripted([True])) == CheckResult(True, "ok")
    assert run_check(Scripted([False])) == CheckResult(False, "failed")
    assert not run_check(Scripted(["yes"])).ok


def test_runner_run_once_transitions(check_scheduler: CheckScheduler) -> None:
    seen: list[tuple[bool, CheckResult]] = []
    runner = CheckRunner(
        CheckSpec(rise=2, fall=1),
        Scripted([OK, OK, RuntimeError("boom"), OK]),
        lambda ok, r: seen.append((ok, r)),
        check_scheduler,
        name="t",
    )
    since = runner.since
    assert [runner.run_once() for _ in range(3)] == [None, True, False]
    assert runner.since >= since and not runner.healthy
    assert seen[0] == (True, OK) and seen[1][0] is False and "boom" in seen[1][1].output
    assert runner.last_result is not None and runner.runs == 3


def test_runner_runs_until_stopped(check_scheduler: CheckScheduler) -> None:
    seen: list[bool] = []
    done = threading.Event()

    def on_transition(ok: bool, result: CheckResult) -> None:
        seen.append(ok)
        if len(seen) == 2:
            done.set()

    check = Scripted([OK, BAD, BAD, OK])
    runner = CheckRunner(CheckSpec(interval=0.02, rise=1, fall=2), check, on_transition,
                         check_scheduler).start()
    assert done.wait(2)
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 0.5 and not runner.running
    assert seen[:2] == [True, False]


def test_runner_first_run_immediate_and_no_drift(check_scheduler: CheckScheduler) -> None:
    check = Scripted([OK], delay=0.03)
    started = time.monotonic()
    runner = CheckRunner(CheckSpec(interval=0.1), check, lambda ok, r: None,
                         check_scheduler).start()
    time.sleep(1.05)  # a measurement window: the runs' timing is what is tested
    runner.stop()
    assert check.times[0] - started < 0.05
    # 0.03s of work per 0.1s tick must not stretch the period: ~11 runs, not ~8
    assert 9 <= len(check.times) <= 12
    gaps = [b - a for a, b in zip(check.times, check.times[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.015)


def test_runner_overrun_skips_ticks(check_scheduler: CheckScheduler) -> None:
    check = Scripted([OK], delay=0.25)
    runner = CheckRunner(CheckSpec(interval=0.1), check, lambda ok, r: None,
                         check_scheduler).start()
    time.sleep(0.9)  # a measurement window: the runs' timing is what is tested
    runner.stop()
    gaps = [b - a for a, b in zip(check.times, check.times[1:], strict=False)]
    assert gaps and all(g >= 0.25 for g in gaps)  # no burst of catch-up runs
    assert sum(gaps) / len(gaps) == pytest.approx(0.3, abs=0.05)  # next free tick of the 0.1s grid


def test_runner_survives_exceptions_and_bad_callbacks(check_scheduler: CheckScheduler) -> None:
    calls: list[bool] = []

    def on_transition(ok: bool, result: CheckResult) -> None:
        calls.append(ok)
        raise RuntimeError("callback bug")

    check = Scripted([RuntimeError("a"), OK, RuntimeError("b"), RuntimeError("c"), OK])
    runner = CheckRunner(CheckSpec(interval=0.01, fall=2), check, on_transition, check_scheduler,
                         healthy=True)
    runner.start()
    wait_for(lambda: len(calls) >= 2, 2, interval=0.01, message="two transitions")
    assert runner.running
    runner.stop()
    assert calls[:2] == [False, True]


def test_runner_stop_quickly_with_long_interval(check_scheduler: CheckScheduler) -> None:
    runner = CheckRunner(CheckSpec(interval=3600), Scripted([OK]), lambda ok, r: None,
                         check_scheduler).start()
    wait_for(lambda: runner.runs >= 1, 2, interval=0.01, message="the first run")  # now idle
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 0.2 and not runner.running


def test_runner_no_callback_after_stop(check_scheduler: CheckScheduler) -> None:
    calls: list[bool] = []
    gate, entered = threading.Event(), threading.Event()

    class Slow:
        def run(self) -> CheckResult:
            entered.set()
            gate.wait(2)
            return OK

    runner = CheckRunner(
        CheckSpec(interval=0.01, timeout=2), Slow(), lambda ok, r: calls.append(ok),
        check_scheduler,
    )
    runner.start()
    assert entered.wait(2), "the check never ran"
    runner.stop()  # returns at once, while the run is still going
    assert not runner.running and runner.runs == 0
    gate.set()  # the run ends healthy (rise = 1), after stop()
    wait_for(lambda: runner.runs == 1, 2, interval=0.01, message="the run in progress to end")
    assert calls == [] and runner.healthy  # the state changed, but no callback was made


def test_runner_stop_from_callback(check_scheduler: CheckScheduler) -> None:
    holder: list[CheckRunner] = []
    runner = CheckRunner(CheckSpec(interval=0.01), Scripted([OK]), lambda ok, r: holder[0].stop(),
                         check_scheduler)
    holder.append(runner)
    runner.start()
    wait_for(lambda: not runner.running, 2, interval=0.01, message="the runner to stop itself")
    assert runner.runs == 1


def test_scheduler_runs_many_checks_on_few_threads() -> None:
    """CheckScheduler: every runner keeps its interval, never overlaps itself, stops cleanly."""
    import threading as _threading

    from discovery.agent.health import CheckRunner, CheckScheduler

    class Counting:
        def __init__(self) -> None:
            self.runs = 0
            self.active = 0
            self.overlap = False

        def run(self) -> CheckResult:
            self.active += 1
            self.overlap |= self.active > 1
            self.runs += 1
            time.sleep(0.01)  # simulated work: long enough for an overlap to show
            self.active -= 1
            return CheckResult(True, "ok")

    before = _threading.active_count()
    scheduler = CheckScheduler(workers=4)
    checks = [Counting() for _ in range(40)]
    seen: list[bool] = []
    runners = [CheckRunner(CheckSpec(type="none", interval=0.1, rise=1, fall=1), c,
                           lambda ok, _r: seen.append(ok), scheduler=scheduler).start()
               for c in checks]
    time.sleep(0.55)  # a measurement window: five ticks of 40 runners on 4 workers
    assert _threading.active_count() - before <= 1 + 4  # the timer + the workers, not 40
    for r in runners:
        r.stop()
    scheduler.stop()
    assert all(3 <= c.runs <= 8 for c in checks), [c.runs for c in checks]
    assert not any(c.overlap for c in checks)
    assert seen.count(True) == 40  # one transition each


# ---- limits (issue 8 §3): checks cannot starve each other ---------------------------------


def test_exec_never_starts_while_the_previous_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakeAPI(hang=True)
    probe = exec_check(api, timeout=0.1)
    assert probe.run().output.startswith("timed out after 0.1s")
    with caplog.at_level("INFO", logger="discovery.agent.checks"):
        for _ in range(3):  # the hung command is still running in the container
            assert probe.run() == CheckResult(False, "previous run still running: "
                                                     "not started again")
        assert [c[0] for c in api.calls] == ["create", "start"]  # no second exec
        skipped = [r for r in caplog.records if "previous run still running" in r.message]
        assert len(skipped) == 1 and skipped[0].levelname == "WARNING"
        assert "c0ffeec0ffee" in skipped[0].message and "check --now" in skipped[0].message
        api.hang = False  # the hung command ended
        assert probe.run() == CheckResult(True, "exit 0")
    assert [c[0] for c in api.calls] == ["create", "start", "create", "start"]
    assert sum("previous run ended" in r.message for r in caplog.records) == 1


def test_http_deadline_covers_the_whole_exchange() -> None:
    """A server trickling one byte every 50 ms never trips the socket timeout; the run still
    ends at its timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 1000:
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        started = time.monotonic()
        result = HttpCheck(CheckSpec(timeout=0.3), target(listener.getsockname()[1])).run()
        took = time.monotonic() - started
    finally:
        stop.set()
        server.join(2)
        listener.close()
    assert result == CheckResult(False, "timed out after 0.3s")
    assert 0.3 <= took < 0.6


class Gate:
    """A check that blocks until released, counting how many of its group run at once."""

    def __init__(self, group: dict[str, Any], release: threading.Event) -> None:
        self.group, self.release, self.runs = group, release, 0

    def run(self) -> CheckResult:
        with self.group["lock"]:
            self.group["active"] += 1
            self.group["max"] = max(self.group["max"], self.group["active"])
        self.release.wait(10)
        with self.group["lock"]:
            self.group["active"] -= 1
        self.runs += 1
        return CheckResult(False, "hung")


def test_one_container_holds_at_most_its_share_of_the_workers() -> None:
    assert PER_CONTAINER_CHECKS == 2
    scheduler = CheckScheduler(workers=8)
    release = threading.Event()
    hog: dict[str, Any] = {"lock": threading.Lock(), "active": 0, "max": 0}
    spec = CheckSpec(type="http", interval=60, timeout=60)
    gates = [Gate(hog, release) for _ in range(9)]  # one container, 9 ports, hung checks
    hogs = [CheckRunner(spec, g, lambda ok, r: None, name=f"hog-{n}", scheduler=scheduler,
                        group="hostile").start() for n, g in enumerate(gates)]
    other_ran = threading.Event()
    other: CheckRunner | None = None
    try:
        wait_for(lambda: hog["active"] == 2, timeout=2, message="two hung runs")
        started = time.monotonic()
        other = CheckRunner(CheckSpec(interval=0.05), Scripted([OK]),
                            lambda ok, r: other_ran.set(), name="other", scheduler=scheduler,
                            group="unrelated").start()
        assert other_ran.wait(2)
        assert time.monotonic() - started < 0.2  # not behind the hung container's queue
        wait_for(lambda: other.runs >= 5, timeout=2, message="the other keeps its interval")
        assert hog["max"] == 2 and sum(g.runs for g in gates) == 0
        release.set()  # the hung checks end: every port of the container gets its turn
        wait_for(lambda: all(g.runs >= 1 for g in gates), timeout=2, message="all 9 ran")
        assert hog["max"] == 2
    finally:
        release.set()
        for r in [*hogs, *([other] if other else [])]:
            r.stop()
        scheduler.stop()


def test_stopped_runners_give_their_share_back() -> None:
    scheduler = CheckScheduler(workers=4)
    release = threading.Event()
    hog: dict[str, Any] = {"lock": threading.Lock(), "active": 0, "max": 0}
    spec = CheckSpec(interval=60, timeout=60)
    old = [CheckRunner(spec, Gate(hog, release), lambda ok, r: None, scheduler=scheduler,
                       group="c1").start() for _ in range(5)]
    try:
        wait_for(lambda: hog["active"] == 2, timeout=2, message="two hung runs")
        for r in old:  # the container restarts: its runners are replaced
            r.stop()
        release.set()
        ran = threading.Event()
        new = CheckRunner(CheckSpec(interval=60), Scripted([OK]), lambda ok, r: ran.set(),
                          scheduler=scheduler, group="c1").start()
        assert ran.wait(2)  # the waiting, stopped runners did not keep the group's slots
        wait_for(lambda: not scheduler._busy and not scheduler._waiting, timeout=2,
                 message="every slot of c1 given back")
        assert sum(g.runs for g in (r.check for r in old) if isinstance(g, Gate)) == 2
        new.stop()
    finally:
        release.set()
        scheduler.stop()
