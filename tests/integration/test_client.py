"""discovery.Client against real etcd and ZooKeeper (and the agent, end to end).

A second Registry object plays the agent where a test needs exact control over what is
written (tags, draining, weights); one test runs the real agent and a labelled container.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discovery.client import Client, ClientClosed, NoInstances
from discovery.errors import ConfigError, DiscoveryError, RegistryUnavailable
from discovery.model import Instance, State
from discovery.registry import Registry, RegistryURL, open_registry
from tests.harness.agent import REPO_ROOT
from tests.harness.client_calls import Recorder, inst, ports
from tests.harness.dockerd import ContainerFactory
from tests.harness.servers import ServerCluster
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def writer(registry_url: str) -> Iterator[Registry]:
    reg = open_registry(registry_url, timeout=5.0)
    yield reg
    reg.close(revoke=True)


@pytest.fixture
def client(registry_url: str) -> Iterator[Client]:
    with Client(registry_url, timeout=5.0) as c:
        yield c


def test_instances_tags_draining_services(client: Client, writer: Registry) -> None:
    writer.register(inst("web", 1, tags=("blue",), weight=10))
    writer.register(inst("web", 2, tags=("blue", "green")))
    writer.register(inst("web", 3, tags=("blue",), state=State.DRAINING))
    writer.register(inst("db", 4))
    assert ports(client.instances("web")) == [8001, 8002]
    assert ports(client.instances("web", tag="green")) == [8002]
    assert ports(client.instances("web", tag="blue")) == [8001, 8002]
    assert ports(client.instances("web", tag="blue", include_draining=True)) == [8001, 8002, 8003]
    assert client.instances("web", tag="red") == [] and client.instances("nope") == []
    assert client.services() == ["db", "web"]
    first = client.instances("web")[0]
    assert (first.address, first.weight, first.tags, first.state) == (
        "127.0.0.1", 10, ("blue",), State.UP)
    writer.deregister("web", inst("web", 1).id)  # no watch: every call reads the registry
    assert ports(client.instances("web")) == [8002]


def test_watch_initial_list_then_changes_in_order(client: Client, writer: Registry) -> None:
    writer.register(inst("web", 1))
    web, blue, db = Recorder(), Recorder(), Recorder()
    handle = client.watch("web", web)
    assert web.wait(1) == [[8001]]  # right away, with what is there
    client.watch("web", blue, tag="blue")
    client.watch("db", db)
    assert blue.wait(1) == [[]] and db.wait(1) == [[]]

    writer.register(inst("web", 2, tags=("blue",)))
    assert web.wait(2)[-1] == [8001, 8002]
    assert blue.wait(2) == [[], [8002]]
    writer.register(inst("web", 1).with_state(State.DRAINING))  # draining: left out
    writer.deregister("web", inst("web", 2).id)
    writer.register(inst("db", 9))
    db.settle([[], [8009]])
    web.settle([[8001], [8001, 8002], [8002], []])  # [8002] may be skipped (coalesced)
    assert blue.wait(3) == [[], [8002], []]
    assert ports(client.instances("web", include_draining=True)) == [8001]  # live catalog
    assert handle.active and handle.instances == []

    handle.stop()
    writer.register(inst("web", 5, tags=("blue",)))
    calls = len(web.calls)
    wait_for(lambda: blue.calls[-1] == [8005], timeout=15, message=f"blue: {blue.calls}")
    assert blue.calls == [[], [8002], [], [8005]]  # the blue watch saw it; not the stopped one
    time.sleep(0.2)  # an absence window: no late call for the stopped handle
    assert len(web.calls) == calls and not handle.active
    assert web.threads == blue.threads == {"discovery-client-callbacks"}


def test_a_failing_callback_does_not_end_the_watch(client: Client, writer: Registry) -> None:
    seen: list[list[int]] = []

    def flaky(instances: list[Instance]) -> None:
        seen.append(ports(instances))
        if len(seen) == 1:
            raise RuntimeError("first call fails")

    client.watch("web", flaky)
    writer.register(inst("web", 1))
    wait_for(lambda: seen == [[], [8001]], timeout=15, message=f"second callback ({seen})")


def test_watch_survives_a_lost_connection(registry_url: str, registry_server: ServerCluster,
                                          writer: Registry) -> None:
    url = RegistryURL.parse(registry_url)
    proxy = TcpProxy(registry_server.address(0))
    calls = Recorder()
    try:
        with Client(proxy.url(url.scheme, url.prefix), timeout=5.0) as client:
            writer.register(inst("web", 1))
            client.watch("web", calls)
            assert calls.wait(1) == [[8001]]
            with proxy.blocked():  # every connection cut, new ones refused
                writer.register(inst("web", 2))
                time.sleep(1.5)  # an absence window: nothing arrives while cut off
                assert calls.calls == [[8001]]  # really cut off
            assert calls.wait(2, timeout=30)[-1] == [8001, 8002]
            writer.deregister("web", inst("web", 1).id)
            assert calls.wait(3, timeout=15)[-1] == [8002]
            assert ports(client.instances("web")) == [8002]
    finally:
        proxy.close()


def test_pick_is_weighted_and_only_up(client: Client, writer: Registry) -> None:
    writer.register(inst("web", 1, weight=1))
    writer.register(inst("web", 2, weight=3, tags=("blue",)))
    writer.register(inst("web", 3, weight=0))
    writer.register(inst("web", 4, weight=100, state=State.DRAINING))
    client.follow()  # picks read the live catalog, not the registry
    counts = {8001: 0, 8002: 0, 8003: 0, 8004: 0}
    for _ in range(4000):
        counts[client.pick("web").port] += 1
    assert counts[8003] == counts[8004] == 0
    assert 0.70 < counts[8002] / 4000 < 0.80, counts
    assert {client.pick("web", tag="blue").port for _ in range(20)} == {8002}
    with pytest.raises(NoInstances, match="no healthy instance of 'web' with tag 'red'"):
        client.pick("web", tag="red")
    with pytest.raises(LookupError):  # NoInstances is both a DiscoveryError and a LookupError
        client.pick("nope")


@pytest.mark.parametrize("scheme", ["etcd", "zk"])
def test_unreachable_registry_fails_fast_and_clearly(scheme: str) -> None:
    port = free_port()
    with Client(f"{scheme}://127.0.0.1:{port}/x", timeout=1.0) as client:
        for call in (lambda: client.instances("web"), client.services,
                     lambda: client.watch("web", print), lambda: client.pick("web")):
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port}") as err:
                call()
            took = time.monotonic() - started
            assert took < 1.0 + 1.0, f"{took:.2f} s with a timeout of 1 s"
            assert isinstance(err.value, DiscoveryError)


def test_from_discovery_import_client_is_lazy() -> None:
    code = ("import sys, discovery; assert 'discovery.client' not in sys.modules; "
            "from discovery import Client; import discovery.client as m; "
            "assert Client is m.Client and discovery.Client is Client; "
            "assert not hasattr(discovery, 'Nope'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False, cwd=REPO_ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_bad_url_and_closed_client(registry_url: str) -> None:
    for bad in ("http://127.0.0.1:2379", "etcd://", ""):
        with pytest.raises(ConfigError):
            Client(bad)
    with pytest.raises(ConfigError, match="timeout"):
        Client(registry_url, timeout=0)
    client = Client(registry_url)
    client.watch("web", lambda _: None)
    client.close()
    client.close()  # idempotent
    with pytest.raises(ClientClosed, match="closed"):
        client.instances("web")
    assert "closed" in repr(client)


# ---- end to end: the agent registers a container, the client sees it come and go ---------


def test_client_follows_the_agent(registry_url: str, start_agent: Callable[..., Any],
                                  containers: ContainerFactory) -> None:
    service = f"e2e{uuid.uuid4().hex[:6]}"
    start_agent(registry_url)
    calls = Recorder()
    with Client(registry_url) as client:
        client.watch(service, calls)
        assert calls.wait(1) == [[]]
        port = free_port()
        app = containers(name=f"{service}-1", port=port, labels={
            "discovery.service": service, "discovery.port": str(port),
            "discovery.check": "http", "discovery.check.path": "/health",
            "discovery.check.interval": "200ms"})
        assert calls.wait(2, timeout=10)[-1] == [port]
        picked = client.pick(service)
        assert (picked.address, picked.port, picked.container_id) == ("127.0.0.1", port, app.id)
        app.stop(timeout=5)  # the agent deletes on Docker's kill event, before this returns
        wait_for(lambda: calls.calls[-1] == [], timeout=2, message=f"[] last in {calls.calls}")
        assert all(c == [port] for c in calls.calls[1:-1]), calls.calls


# ---- examples/client_side.py ------------------------------------------------------------


def named_server(name: str) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "examples/client_side.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_client_side_example_round_robin(registry_url: str, writer: Registry) -> None:
    servers = [named_server("alpha"), named_server("beta")]
    try:
        for n, srv in enumerate(servers, 1):
            writer.register(Instance(service="web", id=f"h1:{n:012x}:80", node="h1",
                                     address="127.0.0.1", port=int(srv.server_address[1])))
        out = run_example("--registry", registry_url, "--service", "web", "--count", "4",
                          "--interval", "0.01")
        assert out.returncode == 0, out.stderr
        answers = [line.rsplit(" ", 1)[1] for line in out.stdout.splitlines()
                   if " -> 200 " in line]
        assert len(answers) == 4 and set(answers) == {"alpha", "beta"}, out.stdout
        assert answers[0] != answers[1] and answers[:2] == answers[2:], out.stdout
        assert out.stdout.startswith("# instances now: 127.0.0.1:"), out.stdout
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_client_side_example_unreachable() -> None:
    out = run_example("--registry", f"etcd://127.0.0.1:{free_port()}/x", "--service", "web",
                      "--timeout", "1")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("error: etcd at 127.0.0.1:"), out.stderr


def test_a_watch_reads_and_follows_its_service_only(registry_url: str, writer: Registry) -> None:
    """Whatever else the registry holds, a process that watches one service reads that one
    (it read the whole registry at its start and followed every change in the fleet), proven
    by counting what came back from the registry; ``follow()`` still reads everything."""
    writer.register(inst("web", 1))
    for n in range(200):
        writer.register(Instance(service="other", id=f"h2:{n:012x}:80", node="h2",
                                 address="127.0.0.1", port=9000 + n))
    with Client(registry_url, timeout=5.0) as client, Client(registry_url, timeout=5.0) as whole:
        calls = Recorder()
        client.watch("web", calls)
        assert calls.wait(1) == [[8001]]
        whole.follow()
        mine = client._registry.reads.counts()  # type: ignore[attr-defined]
        everything = whole._registry.reads.counts()  # type: ignore[attr-defined]
        assert mine.keys <= 3 and everything.keys >= 201, (mine, everything)
        # one read each: the watch's own (on ZooKeeper a snapshot, then the watch's read, before)
        assert (mine.full_reads, everything.full_reads) == (1, 1), (mine, everything)
        assert mine.bytes * 20 < everything.bytes, (mine, everything)
        writer.register(Instance(service="other", id="h2:0000000000ff:80", node="h2",
                                 address="127.0.0.1", port=9500))
        writer.register(inst("web", 2))
        calls.settle([[8001], [8001, 8002]])
        wait_for(lambda: whole._live.catalog is not None and whole._live.catalog.size() == 203,
                 timeout=15, message="the whole catalog")
        assert client._live.catalog is not None and client._live.catalog.size() == 2
        after = client._registry.reads.counts() - mine  # type: ignore[attr-defined]
        # web's change, one record, not other's too (2), and no read of everything again
        assert (after.keys, after.full_reads) == (1, 0), after
        client.follow("db")  # a new watch of both: the registry lets the stopped one go
        assert len(client._registry._watches) == 1  # type: ignore[attr-defined]
