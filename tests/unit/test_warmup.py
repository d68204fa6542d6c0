"""discovery.agent.warmup: the ``discovery.warmup.*`` labels, and the requests themselves."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from discovery.agent.labels import parse_container
from discovery.agent.spec import WarmupSpec
from discovery.agent.tracked import Tracked
from discovery.agent.warmup import WarmupResult, WarmUps, warm_up
from discovery.errors import LabelError
from discovery.model import Instance
from tests.harness.servers import wait_until
from tests.harness.util import free_port
from tests.unit.test_labels import WHO, container


def warmup_of(**labels: str) -> WarmupSpec | None:
    [spec] = parse_container(container({"discovery.service": "web", **labels}))
    return spec.warmup


def test_absent_or_zero_is_no_warm_up() -> None:
    assert warmup_of() is None
    assert warmup_of(**{"discovery.warmup.requests": "0"}) is None


def test_defaults_and_every_field() -> None:
    assert warmup_of(**{"discovery.warmup.requests": "200"}) == WarmupSpec(200, "/", 2, 30.0)
    assert warmup_of(**{"discovery.warmup.requests": "10000", "discovery.warmup.path":
                        "/_ah/warmup?x=1", "discovery.warmup.concurrency": "16",
                        "discovery.warmup.timeout": "5m"}) == WarmupSpec(
        10000, "/_ah/warmup?x=1", 16, 300.0)
    assert warmup_of(**{"discovery.warmup.requests": "1", "discovery.warmup.concurrency": "1",
                        "discovery.warmup.timeout": "500ms"}) == WarmupSpec(1, "/", 1, 0.5)


def test_per_port_overrides_container_wide() -> None:
    specs = parse_container(container(
        {"discovery.80.service": "web", "discovery.81.service": "admin",
         "discovery.warmup.requests": "5", "discovery.81.warmup.requests": "0",
         "discovery.80.warmup.path": "/warm"},
        exposed=("80/tcp", "81/tcp"), published={"80/tcp": "32768", "81/tcp": "32769"}))
    assert [s.warmup for s in specs] == [WarmupSpec(5, "/warm"), None]


@pytest.mark.parametrize(("label", "value", "reason"), [
    ("requests", "-1", "not a whole number in 0..10000"),
    ("requests", "10001", "not a whole number in 0..10000"),
    ("requests", "ten", "not a whole number"),
    ("requests", "\u0661\u0660", "not a whole number"),  # Arabic-Indic digits int() would take
    ("path", "warm", "must start with /"),
    ("path", "/a b", "without spaces"),
    ("path", "/é", "printable ASCII"),
    ("path", "/" + "a" * 256, "at most 256"),
    ("concurrency", "0", "1..16"),
    ("concurrency", "17", "1..16"),
    ("timeout", "301s", "between"),
    ("timeout", "10ms", "between"),
    ("timeout", "soon", ""),
])
def test_bad_value_names_its_label(label: str, value: str, reason: str) -> None:
    with pytest.raises(LabelError) as info:
        warmup_of(**{"discovery.warmup.requests": "5", f"discovery.warmup.{label}": value})
    assert f"{WHO} label discovery.warmup.{label}" in str(info.value)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_bad_value_is_refused_even_with_warm_up_off() -> None:
    with pytest.raises(LabelError, match=r"discovery\.warmup\.concurrency"):
        warmup_of(**{"discovery.warmup.concurrency": "99"})


def test_unknown_warmup_label() -> None:
    with pytest.raises(LabelError, match=r"discovery\.warmup\.count: unknown label"):
        warmup_of(**{"discovery.warmup.count": "5"})


class App:
    """A loopback HTTP server counting GETs by path; answers ``status`` after ``delay`` s."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.paths: list[str] = []
        self.agents: set[str] = set()
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    app.paths.append(self.path)
                    app.agents.add(self.headers.get("User-Agent", ""))
                    app.in_flight += 1
                    app.most_in_flight = max(app.most_in_flight, app.in_flight)
                time.sleep(delay)
                with lock:
                    app.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def app() -> Iterator[App]:
    a = App(status=503, delay=0.02)
    yield a
    a.server.shutdown()
    a.server.server_close()


def test_sends_n_requests_c_at_a_time_any_status_counts(app: App) -> None:
    result = warm_up("127.0.0.1", app.port, WarmupSpec(30, "/warm?x", 3, 10.0))
    assert (result.sent, result.errors, result.complete) == (30, 0, True)
    assert app.paths == ["/warm?x"] * 30 and app.agents == {"discovery-warmup"}
    assert app.most_in_flight == 3
    assert 0.2 <= result.seconds < 5  # 10 rounds of 20 ms


def test_connection_errors_are_counted() -> None:
    result = warm_up("127.0.0.1", free_port(), WarmupSpec(7, "/", 2, 10.0))
    assert (result.sent, result.errors, result.complete) == (7, 7, True)


def test_budget_bounds_the_whole_warm_up() -> None:
    slow = App(delay=0.3)
    try:
        result = warm_up("127.0.0.1", slow.port, WarmupSpec(100, "/", 2, 0.5))
    finally:
        slow.server.shutdown()
        slow.server.server_close()
    assert not result.complete and 2 <= result.sent <= 6, result
    assert result.seconds < 1.5


def test_an_answer_trickling_in_is_cut_at_the_budget() -> None:
    """Each byte in time for the socket's timeout, the answer never ends: the budget holds
    all the same, and no worker is left behind."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    done = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not done.wait(0.1):
                conn.sendall(b"X-A: b\r\n")

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = server.accept()[0]
                conns.append(conn)
                threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    try:
        result = warm_up("127.0.0.1", port, WarmupSpec(100, "/", 3, 0.5))
    finally:
        done.set()
        server.close()
        for conn in conns:
            conn.close()
    assert not result.complete and 1 <= result.sent <= 3, result
    assert result.seconds < 1.5
    assert not [t for t in threading.enumerate() if t.name.startswith(f"warmup-{port}-")]


def test_stop_ends_it_early(app: App) -> None:
    stop = threading.Event()
    stop.set()
    result = warm_up("127.0.0.1", app.port, WarmupSpec(50, "/", 2, 10.0), stop)
    assert (result.sent, result.complete) == (0, False)


def test_in_a_thread_then_the_callback(app: App, caplog: pytest.LogCaptureFixture) -> None:
    done = threading.Event()
    got: list[WarmupResult] = []

    def finished(result: WarmupResult) -> None:
        got.append(result)
        done.set()

    caplog.set_level("INFO", logger="discovery.agent.warmup")
    WarmUps().start("web/h1:abc:80", "127.0.0.1", app.port, WarmupSpec(4), finished)
    assert done.wait(10)
    assert got[0].sent == 4 and len(app.paths) == 4
    assert "web/h1:abc:80 warmed up: 4 requests to / in" in caplog.text


def test_an_agents_warm_ups_run_a_few_at_a_time(app: App) -> None:
    """A container of hundreds of services, each asking for a warm-up: each had a thread of its
    own and up to 16 workers (thousands of threads, the pids limit). Now MAX_RUNNING at once,
    the others in their turn; a queued one's budget counts from when it was asked."""
    got: list[WarmupResult] = []
    lock = threading.Lock()

    def finished(result: WarmupResult) -> None:
        with lock:
            got.append(result)

    warmups, slowish = WarmUps(running=2), App(delay=0.1)
    try:
        for n in range(10):
            warmups.start(f"web/{n}", "127.0.0.1", slowish.port, WarmupSpec(2, "/", 2, 30.0),
                          finished)
        wait_until(lambda: len(got) == 10, 10, "every warm-up done")
    finally:
        slowish.server.shutdown()
        slowish.server.server_close()
    # 2 warm-ups x 2 workers (all ten at once: 20, for 0.1 s)
    assert slowish.most_in_flight <= 4 and all(r.complete for r in got)
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("warmup")],
               5, "the pool's threads ended once nothing waits")
    late = WarmUps(running=1)
    stuck = App(delay=0.8)
    try:
        late.start("slow", "127.0.0.1", stuck.port, WarmupSpec(1, "/", 1, 30.0), finished)
        late.start("queued", "127.0.0.1", app.port, WarmupSpec(1, "/", 1, 0.2), finished)
        wait_until(lambda: len(got) == 12, 10, "the queued one done")
    finally:
        stuck.server.shutdown()
        stuck.server.server_close()
    assert not got[-1].complete and got[-1].sent == 0  # its budget spent in the queue


def test_an_instance_is_warm_only_once_its_warm_up_is_had() -> None:
    """The agent's reconcile writes only warm instances: one whose check passed but whose
    warm-up has not started yet (its transition waiting for the agent's lock) is not, or the
    reconcile would register it before its warm-up (seen in make test)."""
    keys = [("web", "n1:abc:80"), ("db", "n1:abc:5432")]
    tracked = Tracked("abc", 0, {k: Instance(service=k[0], id=k[1], address="127.0.0.1", node="n1",
                                             port=80) for k in keys})
    tracked.warmups[keys[0]] = WarmupSpec(12)
    assert not tracked.warm(keys[0]) and tracked.warm(keys[1])  # db asks for none
    assert tracked.start_warmup(keys[0]) == WarmupSpec(12)
    assert not tracked.warm(keys[0])  # under way
    tracked.warming.discard(keys[0])  # as _warmed does
    assert tracked.warm(keys[0])


def test_a_warm_up_that_gets_no_thread_registers_at_once_and_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At the pids limit: ``done`` at once (the instance registered, not warming for good),
    and never again from a queue that kept the job."""
    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr("discovery.agent.warmup.threading.Thread", NoThread)
    got: list[WarmupResult] = []
    warmups = WarmUps()
    warmups.start("web/1", "127.0.0.1", free_port(), WarmupSpec(3), got.append)
    assert got == [WarmupResult(0, 0, 0.0, False)] and not warmups._queue


def test_after_stop_a_queued_warm_up_sends_and_logs_nothing(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    got: list[WarmupResult] = []
    stuck = App(delay=0.5)
    try:
        warmups = WarmUps(stop, running=1)
        warmups.start("slow", "127.0.0.1", stuck.port, WarmupSpec(1, "/", 1, 30.0), got.append)
        warmups.start("queued", "127.0.0.1", app.port, WarmupSpec(5), got.append)
        wait_until(lambda: stuck.in_flight == 1, 5, "the first warm-up under way")
        stop.set()  # the agent stops while the first runs
        wait_until(lambda: not warmups._queue and warmups._threads == 0, 5, "the queue done")
    finally:
        stuck.server.shutdown()
        stuck.server.server_close()
    assert app.paths == [] and "queued" not in caplog.text
