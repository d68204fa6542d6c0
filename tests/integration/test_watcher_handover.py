"""Watcher restarts and upgrades are hitless: the HAProxy a watcher leaves is adopted or taken
over, never stopped under the apps' feet. Real watchers (processes), real HAProxy 2.6, real
etcd / ZooKeeper; steady load of 4 clients, a new connection per request."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from discovery.model import Instance
from discovery.registry import Registry, open_registry
from discovery.registry.url import RegistryURL
from discovery.watcher.adopt import alive, ours
from discovery.watcher.remember import recall, source_of
from tests.harness.agent import DiscoveryProcess
from tests.harness.haproxy import HAPROXY_BIN, NamedBackend, http_get
from tests.harness.load import SteadyLoad
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import dns_tcp_reply, free_port, wait_for
from tests.harness.watcher import spread

pytestmark = pytest.mark.integration


def inst(n: int, port: int) -> Instance:
    return Instance(service="web", id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=port)


class Host:
    """One host's state dir, the watchers started on it, and its routed port."""

    def __init__(self, url: str, log_dir: Path) -> None:
        self.url, self.log_dir = url, log_dir
        self.state = Path(tempfile.mkdtemp(prefix="dw-", dir="/tmp"))  # short socket paths
        self.port = free_port()
        self.started: list[DiscoveryProcess] = []

    def watcher(self, *extra: str) -> DiscoveryProcess:
        args = ["watch", "--registry", self.url, "--service", f"web:{self.port}",
                "--state-dir", str(self.state), *extra]
        proc = DiscoveryProcess(args, f"watcher-{len(self.started) + 1}", self.log_dir).start()
        self.started.append(proc)
        return proc

    def master(self) -> int:
        return int((self.state / "haproxy.pid").read_text().split()[0])

    def masters(self) -> list[int]:
        """Every live HAProxy master of this state dir (workers have a master as parent)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and alive(int(entry.name)) \
                    and ours(int(entry.name), self.state / "master.sock"):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent = int(stat[1])
                if not ours(parent, self.state / "master.sock"):
                    found.append(int(entry.name))
        return found

    def routes(self, names: set[str]) -> bool:
        return set(spread(self.port, 2 * len(names))) == names

    def close(self) -> None:
        for proc in self.started:
            proc.terminate()
        for pid in self.masters():  # a test that failed half-way: stop what it left, by pid
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Callable[[str], Host]]:
    made: list[Host] = []

    def make(url: str) -> Host:
        made.append(Host(url, tmp_path))
        return made[-1]

    yield make
    for h in made:
        for proc in h.started:
            print(f"----- {proc.name} -----\n{proc.log()[-4000:]}")
        h.close()


class Routed:
    """A host whose first watcher routes ``web`` to backend ``a``; ``reg`` writes instances."""

    def __init__(self, host: Host, reg: Registry, backends: list[NamedBackend]) -> None:
        self.host, self.reg, self.backends = host, reg, backends
        self.first = host.watcher()
        wait_for(lambda: host.routes({"a"}), 20, message="the first watcher routes")
        self.master = host.master()


@pytest.fixture
def routed(request: pytest.FixtureRequest, http_backends, host) -> Iterator[Routed]:
    """On etcd, or on ZooKeeper with ``@pytest.mark.parametrize("routed", ["zk"],
    indirect=True)``; backends ``a`` and ``b`` are ``routed.backends``."""
    server: ServerCluster = request.getfixturevalue(
        "zk_single" if getattr(request, "param", "etcd") == "zk" else "etcd_single")
    server.ensure_running()
    url = server.url(unique_prefix())
    backends = http_backends("a", "b")
    reg = open_registry(url)
    try:
        reg.register(inst(1, backends[0].port))
        yield Routed(host(url), reg, backends)
    finally:
        reg.close(revoke=True)


@pytest.mark.parametrize("routed", ["zk"], indirect=True)
def test_sigkilled_watcher_restarted_adopts_its_haproxy(routed):
    h, b = routed.host, routed.backends[1]
    with SteadyLoad(h.port) as load:
        routed.first.kill()  # SIGKILL: HAProxy (its own session) keeps serving
        routed.reg.register(inst(2, b.port))  # a change while no watcher runs
        load.wait_more(300)
        second = h.watcher()
        wait_for(lambda: "adopted HAProxy master" in second.log(), 30,
                 message="the new watcher adopts the running HAProxy")
        wait_for(lambda: h.routes({"a", "b"}), 20, message="the missed change applied")
        load.wait_more(300)
    assert load.failed == 0, str(load)
    assert h.master() == routed.master and h.masters() == [routed.master]  # never two
    assert "reloaded" not in second.log()  # the runtime API brought it up to date


def test_leave_signal_then_new_watcher(routed):
    h = routed.host
    kept = h.state / "catalog.last.json"
    wait_for(kept.exists, 10, message="the last catalog written")
    old = time.time() - 3600
    os.utime(kept, (old, old))
    with SteadyLoad(h.port) as load:
        routed.first.signal(signal.SIGUSR2)
        assert routed.first.wait(20) == 0
        assert kept.stat().st_mtime > old  # made current as it left, for its successor
        assert alive(routed.master)
        load.wait_more(200)
        second = h.watcher()
        wait_for(lambda: "adopted HAProxy master" in second.log(), 30, message="adopted")
        load.wait_more(300)
    assert load.failed == 0, str(load)
    assert h.masters() == [routed.master]


def test_other_binary_takes_the_sockets_over(routed, tmp_path):
    """A watcher with another HAProxy binary starts while the first still runs: it starts its
    own master with -x (the listening sockets handed over), the old HAProxy soft-stops, the
    first watcher lets go; then the first is stopped with SIGTERM, which must not stop the new
    HAProxy."""
    h, old = routed.host, routed.master
    other = tmp_path / "haproxy-upgraded"
    shutil.copy(HAPROXY_BIN, other)
    with SteadyLoad(h.port) as load:
        second = h.watcher("--haproxy-bin", str(other))
        wait_for(lambda: "took the listening sockets over" in second.log(), 30,
                 message="the takeover")
        wait_for(lambda: not alive(old), 20, message="the old master soft-stopped")
        wait_for(lambda: "another watcher" in routed.first.log(), 10,
                 message="the first watcher lets go")
        load.wait_more(200)
        assert routed.first.terminate() == 0
        load.wait_more(300)
    assert load.failed == 0, str(load)
    [new] = h.masters()
    assert new != old and os.readlink(f"/proc/{new}/exe") == str(other)
    assert f"-x {h.state / 'admin.sock'}" in second.log()


def test_sigterm_still_stops_haproxy(routed):
    assert routed.first.terminate() == 0
    assert not alive(routed.master) and routed.host.masters() == []
    with pytest.raises(OSError):
        http_get(routed.host.port, timeout=1)


def test_worker_crash_serves_again(routed):
    h, master = routed.host, routed.master
    worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])

    def served() -> bool:
        try:
            return http_get(h.port, timeout=1) == (200, "a")
        except OSError:
            return False

    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    wait_for(served, 1.0, interval=0.002, message="serving again within 1 s")  # 64-107 ms measured
    took = (time.monotonic() - killed) * 1000
    wait_for(lambda: "serving again" in routed.first.log(), 10, message="the restart logged")
    print(f"\nworker SIGKILL -> first 200 through the watcher's HAProxy: {took:.0f} ms")


class LookupLoad:
    """Steady lookups against a watcher's DNS (UDP and TCP) and HTTP API, one thread each,
    every request on a new socket, bounded in count and time; what failed and why."""

    def __init__(self, dns_port: int, http_port: int, max_each: int = 20_000,
                 max_seconds: float = 60.0) -> None:
        from dnslib import DNSRecord

        self.question = DNSRecord.question("web.service.discovery", "A")
        self.dns_port, self.http_port, self.max_each = dns_port, http_port, max_each
        self.deadline = time.monotonic() + max_seconds
        self.ok: dict[str, int] = {"udp": 0, "tcp": 0, "http": 0}
        self.failures: list[str] = []
        self.last_ok: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True)
                         for kind in self.ok]

    def _one(self, kind: str) -> None:
        from dnslib import DNSRecord

        wire = self.question.pack()
        if kind == "http":
            status, body = http_get(self.http_port, "/v1/services/web", timeout=2)
            assert status == 200 and '"web"' in body, (status, body[:200])
            return
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2.0)
                s.sendto(wire, ("127.0.0.1", self.dns_port))
                answer = s.recv(65535)
        else:
            with socket.create_connection(("127.0.0.1", self.dns_port), timeout=2.0) as s:
                s.sendall(struct.pack(">H", len(wire)) + wire)
                answer = dns_tcp_reply(s)
        reply = DNSRecord.parse(answer)
        assert reply.header.rcode == 0 and [str(r.rdata) for r in reply.rr] == ["127.0.0.1"]

    def _run(self, kind: str) -> None:
        for _ in range(self.max_each):
            if self._stop.is_set() or time.monotonic() > self.deadline:
                return
            try:
                self._one(kind)
            except Exception as exc:  # refused, reset, timed out, a wrong answer
                self.failures.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
            else:
                self.ok[kind] += 1
                self.last_ok[kind] = time.monotonic()
            time.sleep(0.002)

    def wait_more(self, n: int, timeout: float = 15.0) -> None:
        """Until each kind has ``n`` more answers."""
        want = {k: v + n for k, v in self.ok.items()}
        wait_for(lambda: all(self.ok[k] >= want[k] for k in want), timeout,
                 message=f"{n} more lookups of each kind: {self}")

    def __enter__(self) -> LookupLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def __str__(self) -> str:
        return f"answered {self.ok}, failed {len(self.failures)}: {self.failures[:5]}"


def test_dns_and_http_handed_over_to_the_next_watcher(
        request: pytest.FixtureRequest, http_backends: Callable[..., list[NamedBackend]],
        host: Callable[[str], Host]) -> None:
    """`watch --dns --http` replaced (SIGUSR2, the next one started at once on the same state
    dir): the next watcher takes the DNS (UDP, TCP) and HTTP listening sockets over from the
    leaving one, which answers until then: not one lookup refused, lost or unanswered."""
    server: ServerCluster = request.getfixturevalue("etcd_single")
    server.ensure_running()
    url = server.url(unique_prefix())
    backend = http_backends("a")[0]
    reg = open_registry(url)
    try:
        reg.register(inst(1, backend.port))
        h = host(url)
        dns_port, http_port = free_port(), free_port()
        extra = ("--dns", f"127.0.0.1:{dns_port}", "--http", f"127.0.0.1:{http_port}")
        first = h.watcher(*extra)
        wait_for(lambda: h.routes({"a"}), 20, message="the first watcher routes")
        with LookupLoad(dns_port, http_port) as load:
            load.wait_more(50)
            first.signal(signal.SIGUSR2)
            second = h.watcher(*extra)  # at once: it waits for the offer
            assert first.wait(20) == 0
            load.wait_more(100)  # answered by the second watcher alone
        assert load.failures == [], str(load)
        assert "took the DNS/HTTP listeners of the previous process: dns-tcp, dns-udp, http" \
            in second.log()
        assert "the next process answers on the DNS/HTTP listeners" in first.log()
        assert "adopted HAProxy master" in second.log()
    finally:
        reg.close(revoke=True)


def test_a_watcher_restarted_while_the_registry_is_wiped_routes_on(request, http_backends,
                                                                    host, tmp_path):
    """SIGKILL the watcher, wipe the registry (every lease revoked, nobody writes back), start
    the next watcher: it adopts HAProxy and compares its first read with the last catalog it
    kept (``catalog.last.json``), so the wipe is held as by a watcher that ran through it, and
    released after ``hold``. Before, it converged the HAProxy it adopted to the empty
    registry: every request failed until the agents wrote back."""
    server: ServerCluster = request.getfixturevalue("etcd_single")
    server.ensure_running()
    url = server.url(unique_prefix())
    a, b = http_backends("a", "b")
    writer = open_registry(url)
    try:
        for n, backend in ((1, a), (2, b)):  # two nodes: one host's death is no wipe
            writer.register(replace(inst(n, backend.port), id=f"h{n}:{n:012x}:80",
                                    node=f"h{n}"))
        h = host(url)
        conf = tmp_path / "watch.toml"
        conf.write_text('[watcher]\nwipe_guard = { hold = "5s" }\n')
        first = h.watcher("--config", str(conf))
        wait_for(lambda: h.routes({"a", "b"}), 20, message="the first watcher routes a and b")
        kept = h.state / "catalog.last.json"
        source = source_of(RegistryURL.parse(url))
        wait_for(lambda: kept.exists() and len(recall(kept, source).instances) == 2, 10,
                 message="the last catalog written")
        first.kill()
    finally:
        writer.close(revoke=True)  # the wipe: both gone, no one to write them back
    with SteadyLoad(h.port) as load:
        second = h.watcher("--config", str(conf))
        wait_for(lambda: "wipe guard engaged" in second.log(), 30,
                 message="the first read held as a wipe", interval=0.02)
        engaged = time.monotonic()
        wait_for(lambda: "adopted HAProxy master" in second.log(), 3, message="adopted")
        load.wait_more(200, timeout=3)
        served = time.monotonic() - engaged
    assert load.failed == 0 and served < 4, f"{load} ({served:.1f} s held)"
    wait_for(lambda: set(spread(h.port, 2)) == {"!503"}, 5 + 1.5 - (time.monotonic() - engaged),
             message="released after hold (5 s): nothing routed, the registry empty")
