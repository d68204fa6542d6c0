"""The HTTP API's limits on connections: a cap in all and per client (an IPv4 address, an IPv6
/64), refusals logged once per cause rather than per connection, and a request read whole
within its deadline however slowly it is sent. Servers listen on free loopback ports; waits
poll with deadlines."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from discovery.lookup import http_handler
from discovery.lookup.http import HttpApi
from discovery.model.catalog import Catalog
from tests.harness.servers import wait_until


@pytest.fixture
def open_sockets() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def connect(port: int, socks: list[socket.socket], source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0))
    socks.append(sock)
    return sock


def hung_up(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0.05)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def refused_with(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON body a refused connection is answered with before it is closed."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"retry-after: 1" in head.lower()
    return int(head.split()[1]), json.loads(body)


def test_connections_are_capped_in_all_and_per_client(
        caplog: pytest.LogCaptureFixture, open_sockets: list[socket.socket]) -> None:
    api = HttpApi(Catalog(), dict, None, "127.0.0.1", 0, max_connections=3,
                  max_connections_per_client=2).start()
    try:
        for _ in range(2):  # slow clients: connected, nothing sent, a thread each
            connect(api.port, open_sockets)
        wait_until(lambda: api.connections.used == 2, 5, "two idle connections accepted")
        for _ in range(3):  # the same address again: refused, every time
            status, body = refused_with(connect(api.port, open_sockets))
            assert status == 429 and "from 127.0.0.1 (2 at once)" in body["error"]
        connect(api.port, open_sockets, "127.0.0.2")  # another address has its own share
        wait_until(lambda: api.connections.used == 3, 5, "a third client's connection")
        for source in ("127.0.0.3", "127.0.0.4"):  # 3 open in all: nobody else
            status, body = refused_with(connect(api.port, open_sockets, source))
            assert status == 503 and "(3)" in body["error"]
        assert api.connections.used == 3
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 2, refusals  # one line per cause, not one per connection
        assert "from 127.0.0.1" in refusals[0] and "(3)" in refusals[1]
        for sock in open_sockets:
            sock.close()
        wait_until(lambda: api.connections.used == 0, 5, "hang-ups giving their slots back")
        with connect(api.port, open_sockets) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.makefile("rb").readline().split()[1] == b"200"
    finally:
        api.stop()


def test_ipv6_clients_count_per_64_and_ipv4_per_address() -> None:
    api = HttpApi(Catalog(), dict, None, max_blocking=10, max_blocking_per_client=2)
    for peer in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"):
        assert api.slots.acquire(peer) is None
    refused = api.slots.acquire("2001:db8:1:2:abcd::3")  # a third address of the same /64
    assert refused is not None and "2001:db8:1:2::/64" in str(refused)
    assert api.slots.acquire("2001:db8:1:3::1") is None  # the next /64: its own share
    assert api.slots.acquire("192.0.2.1") is None and api.slots.acquire("192.0.2.1") is None
    assert api.slots.acquire("192.0.2.1") is not None
    assert api.slots.acquire("192.0.2.2") is None  # IPv4: each address its own share
    api.slots.release("2001:db8:1:2::1")  # another address of the /64 gives one back
    assert api.slots.acquire("2001:db8:1:2::77") is None


class SteppingClock:
    """A monotonic clock that moves ``step`` seconds each time it is read, counting reads."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.calls = 0.0, step, 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
            self.now += self.step
            return self.now


def test_a_request_dripped_byte_by_byte_is_cut_at_its_deadline(
        monkeypatch: pytest.MonkeyPatch, open_sockets: list[socket.socket]) -> None:
    """Each byte arrives well within the per-read timeout; the whole request does not arrive
    within ``Handler.timeout`` of the accept (the clock moves 3/10 of it per read), so the
    server hangs up after three reads instead of reading on for as long as bytes come."""
    monkeypatch.setattr(http_handler.Handler, "timeout", 100.0)
    clock = SteppingClock(30.0)
    monkeypatch.setattr(http_handler, "monotonic", clock, raising=False)
    api = HttpApi(Catalog(), dict, None, "127.0.0.1", 0).start()
    try:
        sock = connect(api.port, open_sockets)
        wait_until(lambda: clock.calls >= 2, 5, "the server reading against a deadline")
        drip = b"GET /v1/health HTTP/1.0\r\nX-Slow: " + b"a" * 100
        sent = 0
        while not hung_up(sock):
            assert sent < len(drip), "a request sent slowly was read for as long as it came"
            before = clock.calls  # the server waits in a read: counted before it
            sock.send(drip[sent:sent + 1])
            sent += 1
            wait_until(lambda calls=before: clock.calls > calls or hung_up(sock), 5,
                       "the byte read")
        assert sent <= 4
    finally:
        api.stop()


def closed_unanswered(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionError:
        return True


def test_a_connection_that_gets_no_thread_is_closed_and_said_once_a_minute(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], open_sockets: list[socket.socket]) -> None:
    """No thread for a connection (the pids limit): it is closed, its slot given back, and a
    warning said once a minute; socketserver wrote a 13-line traceback to stderr each time."""
    api = HttpApi(Catalog(), dict, None, "127.0.0.1", 0).start()
    start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        if getattr(vars(self).get("_target"), "__name__", "") == "process_request_thread":
            raise RuntimeError("can't start new thread")
        start(self)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", no_thread)
            for _ in range(3):
                sock = connect(api.port, open_sockets)
                sock.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
                assert closed_unanswered(sock)
        wait_until(lambda: api.connections.used == 0, 5, "the slots given back")
        said = [r for r in caplog.records if "closed" in r.getMessage()]
        assert len(said) == 1 and "can't start new thread" in said[0].getMessage()
        assert said[0].levelname == "WARNING"
        assert "Traceback" not in capsys.readouterr().err
    finally:
        api.stop()


@pytest.mark.parametrize(("error", "said"), [(ValueError("a bug"), 1),
                                             (ConnectionResetError("gone"), 0)])
def test_an_error_in_a_connection_is_logged_once_a_minute(
        error: Exception, said: int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
        open_sockets: list[socket.socket]) -> None:
    """A handler that raises: its traceback logged once a minute (a client gone: a debug
    line), never socketserver's traceback on stderr for each connection."""
    def fail(self: Any) -> None:
        raise error
    monkeypatch.setattr(http_handler.Handler, "handle", fail)
    api = HttpApi(Catalog(), dict, None, "127.0.0.1", 0).start()
    try:
        for _ in range(3):
            assert closed_unanswered(connect(api.port, open_sockets))
        wait_until(lambda: api.connections.used == 0, 5, "the slots given back")
        errors = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
        assert len(errors) == said and all(r.exc_info for r in errors)
        assert "Traceback" not in capsys.readouterr().err
    finally:
        api.stop()
