"""discovery.agent.checks: the probes (tcp, http, exec, docker, none) and their parsers."""

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
    DockerCheck,
    ExecCheck,
    HttpCheck,
    NoneCheck,
    TcpCheck,
    parse_command,
    status_matcher,
)
from discovery.agent.spec import CheckResult, CheckSpec, CheckTarget
from discovery.errors import CheckError

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


@pytest.mark.parametrize("hidden", ["\u202e", "\u200b", "\u2066", "\ufeff", "\u00ad"])
def test_exec_output_has_no_bidi_or_zero_width_characters(hidden: str) -> None:
    """Format characters (Unicode Cf) would display the output reversed or hide text on the
    status page: each is made a space, as control characters are."""
    result = exec_check(FakeAPI(1, [f"ok{hidden}gnp.exe\n".encode()])).run()
    assert result.output == "exit 1: ok gnp.exe"
    assert checks.clip(f"a{hidden}b") == "a b"


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
