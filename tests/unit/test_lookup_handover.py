"""The DNS/HTTP listener handover (discovery/lookup/handover.py) inside one process: the
"old" servers offer their sockets on a unix socket, the "new" ones take them, answer on them,
acknowledge, and the old ones stop without closing them under the new ones."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from dnslib import DNSRecord

from discovery.errors import ConfigError
from discovery.lookup import handover
from discovery.lookup.dns import DnsServer
from discovery.lookup.http import HttpApi
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot


def catalog(address: str) -> Catalog:
    inst = Instance(service="web", id="n1:000000000001:80", node="n1", address=address, port=80)
    cat = Catalog()
    cat.load(Snapshot({inst.key: inst}, revision=1))
    return cat


def ask(port: int) -> list[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.sendto(DNSRecord.question("web.service.discovery", "A").pack(), ("127.0.0.1", port))
        return [str(r.rdata) for r in DNSRecord.parse(s.recv(65535)).rr]


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/services/web", timeout=2) as r:
        return str(r.read().decode())


def test_sockets_handed_over_and_still_answering(tmp_path: Path) -> None:
    old_dns = DnsServer(catalog("192.0.2.1"), "127.0.0.1", 0).start()
    old_http = HttpApi(catalog("192.0.2.1"), dict, None, "127.0.0.1", 0).start()
    dns_port, http_port = old_dns.port, old_http.port
    assert ask(dns_port) == ["192.0.2.1"] and "192.0.2.1" in get(http_port)
    offered: list[bool] = []
    t = threading.Thread(target=lambda: offered.append(handover.offer(
        tmp_path, [*old_dns.listeners(), *old_http.listeners()], wait=10)))
    t.start()
    busy = [(socket.SOCK_DGRAM, "127.0.0.1", dns_port), (socket.SOCK_STREAM, "127.0.0.1", dns_port),
            (socket.SOCK_STREAM, "127.0.0.1", http_port)]
    assert handover.busy(busy)
    taken = handover.from_predecessor(tmp_path, busy, wait=5)
    assert taken is not None and sorted(taken.sockets) == ["dns-tcp", "dns-udp", "http"]
    assert taken.pop("http", "127.0.0.1", http_port + 1) is None  # another address: not used
    udp, tcp = taken.pop("dns-udp", "127.0.0.1", dns_port), taken.pop("dns-tcp", "127.0.0.1", 0)
    assert udp is not None and tcp is not None
    new_dns = DnsServer(catalog("192.0.2.2"), "127.0.0.1", dns_port).start((udp, tcp))
    new_http = HttpApi(catalog("192.0.2.2"), dict, None, "127.0.0.1", http_port).start(
        taken.pop("http", "127.0.0.1", http_port))
    taken.ack()
    t.join(10)
    assert offered == [True]
    old_dns.stop(handoff=True)
    old_http.stop(handoff=True)
    try:  # the old ones let go without closing the sockets: the new ones answer every time
        for _ in range(20):
            assert ask(dns_port) == ["192.0.2.2"]
            assert "192.0.2.2" in get(http_port)
    finally:
        new_dns.stop()
        new_http.stop()
    assert not (tmp_path / handover.SOCKET_NAME).exists()
    assert not handover.busy(busy)  # closed for good once the last holder stops


def test_nobody_to_take_over_from(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert handover.from_predecessor(tmp_path, [(socket.SOCK_STREAM, "127.0.0.1", 0)]) is None
        s.listen(1)  # in use, and nobody offers it: the error a bind would give, after a wait
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            other = free.getsockname()[1]
        # named: the one address in use, not the free ones asked for with it
        named = rf"listen on 127\.0\.0\.1:{port}/tcp: address in use"
        with pytest.raises(ConfigError, match=named):
            handover.from_predecessor(tmp_path, [(socket.SOCK_DGRAM, "127.0.0.1", other),
                                                 (socket.SOCK_STREAM, "127.0.0.1", other),
                                                 (socket.SOCK_STREAM, "127.0.0.1", port)],
                                      wait=0.3)
    assert handover.offer(tmp_path, [], wait=0.3) is False  # nobody came: closes its own
    assert not (tmp_path / handover.SOCKET_NAME).exists()


def offering(tmp_path: Path, cancelled: threading.Event
             ) -> tuple[DnsServer, list[bool], threading.Thread, handover.Taken]:
    """An old DNS server offering its listeners (until ``cancelled``), what offer() said (its
    thread), and the listeners a successor took (not acknowledged yet)."""
    old = DnsServer(catalog("192.0.2.1"), "127.0.0.1", 0).start()
    said: list[bool] = []
    thread = threading.Thread(target=lambda: said.append(handover.offer(
        tmp_path, old.listeners(), wait=10, cancelled=cancelled.is_set)), daemon=True)
    thread.start()
    busy = [(socket.SOCK_DGRAM, "127.0.0.1", old.port),
            (socket.SOCK_STREAM, "127.0.0.1", old.port)]
    taken = handover.from_predecessor(tmp_path, busy, wait=5)
    assert taken is not None
    return old, said, thread, taken


def test_the_old_process_answers_on_until_a_slow_successor_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successor whose catalog does not load (its registry down during the upgrade) has not
    answered after ACK_WAIT: the old process answered nothing from then on, the queries
    queued in the sockets unread. It answers on until the successor does."""
    monkeypatch.setattr(handover, "ACK_WAIT", 0.3)
    cancelled = threading.Event()
    old, said, thread, taken = offering(tmp_path, cancelled)
    try:
        thread.join(1.0)  # past ACK_WAIT: still waiting for the successor, still answering
        assert thread.is_alive() and ask(old.port) == ["192.0.2.1"]
        taken.ack()
        thread.join(5)
        assert said == [True]
    finally:
        cancelled.set()
        old.stop()


def test_sigterm_while_waiting_for_the_successors_answer_stops_at_once(tmp_path: Path) -> None:
    """The docs' "SIGTERM during the wait stops it at once": the wait for the successor's
    answer ignored it for up to 30 s (past a container runtime's 10 s stop timeout)."""
    cancelled = threading.Event()
    old, said, thread, taken = offering(tmp_path, cancelled)
    try:
        cancelled.set()  # (never acknowledged)
        thread.join(2)
        assert not thread.is_alive() and said == [False]
        taken.close()
    finally:
        old.stop()


class Started:
    """A fake endpoint start: raises ``ConfigError`` (address in use) ``refusals`` times."""

    def __init__(self, log: list[str], name: str, refusals: int = 0) -> None:
        self.log, self.name, self.refusals = log, name, refusals

    def __call__(self) -> Started:
        if self.refusals:
            self.refusals -= 1
            self.log.append(f"{self.name} refused")
            raise ConfigError(f"{self.name}: cannot listen: address in use")
        self.log.append(f"{self.name} started")
        return self

    def listeners(self) -> list[handover.Listener]:
        return []

    def stop(self, *, handoff: bool = False) -> None:
        pass


class Ack:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ack(self) -> None:
        self.log.append("ack")

    def close(self) -> None:
        pass


def test_an_address_not_handed_over_is_bound_once_the_previous_process_lets_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The successor asks another address than the one offered (127.0.0.1 where 0.0.0.0 was):
    that one is bound after the ack, tried until the previous process lets go of the port it
    held; bound before, it failed, and the process ran on without it, looking healthy."""
    from discovery.lookup import serve

    monkeypatch.setattr(serve, "REBIND_WAIT", 5.0)
    log: list[str] = []
    stopped: list[bool] = []
    lookups = serve.Lookups(on_failure=lambda: stopped.append(True))
    lookups.take_over(lambda _t: True, [(True, Started(log, "dns")),
                                        (False, Started(log, "http", refusals=2))],
                      Ack(log))  # type: ignore[arg-type]
    assert log == ["dns started", "ack", "http refused", "http refused", "http started"]
    assert lookups.failed is None and not stopped


def test_an_endpoint_that_cannot_start_after_a_handover_stops_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from discovery.lookup import serve

    monkeypatch.setattr(serve, "REBIND_WAIT", 0.3)
    log: list[str] = []
    stopped: list[bool] = []
    lookups = serve.Lookups(on_failure=lambda: stopped.append(True))
    lookups.take_over(lambda _t: True, [(False, Started(log, "http", refusals=1000))],
                      Ack(log))  # type: ignore[arg-type]
    assert stopped == [True] and lookups.failed is not None and "address in use" in lookups.failed
