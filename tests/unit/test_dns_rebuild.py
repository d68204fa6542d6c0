"""The DNS zone rebuilt after a catalog change: built outside the lock that the TCP listener's
accept and its connections take, and swapped in whole, so queries are answered from the zone
of a moment before while a rebuild runs (a whole build at 10,000 instances: ~0.2 s; one
after a change, from the zone before: well under 1 ms). A rebuild here is held
on an event, not slowed by a sleep; waits poll with deadlines."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from dnslib import DNSRecord

from discovery.lookup import dns
from discovery.lookup.dns import DnsServer
from discovery.lookup.dns_zone import Zone
from discovery.registry.base import Change
from tests.harness.servers import wait_until
from tests.unit.test_dns import inst, make_catalog, query, tcp, udp

WEB = [inst("web", i, f"192.0.2.{i}", node=f"n{i}") for i in range(1, 4)]


def addresses(reply: bytes) -> set[str]:
    return {str(r.rdata) for r in DNSRecord.parse(reply).rr}


def test_tcp_and_udp_answer_while_the_zone_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = make_catalog(WEB)
    real = Zone.from_catalog
    building, release = threading.Event(), threading.Event()
    builds: list[int] = []

    def held(cat: Any, *args: Any) -> Zone:  # a big catalog's rebuild, held till let go
        builds.append(cat.index)
        if len(builds) > 1:
            building.set()
            release.wait(10)
        return real(cat, *args)

    monkeypatch.setattr(Zone, "from_catalog", held)
    monkeypatch.setattr(dns, "REBUILD_WAIT", 0.0)  # the change may rebuild at once
    old = {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    with DnsServer(catalog, port=0) as server:
        try:
            assert addresses(tcp(server.port, query("web.service.discovery"))) == old
            new = inst("web", 9, "192.0.2.9", node="n9")
            catalog.apply(Change("put", new.key, new))
            rebuild = threading.Thread(target=server.zone, name="test-rebuild", daemon=True)
            rebuild.start()
            wait_until(building.is_set, 5, "the rebuild to start")
            # the rebuild is held: both transports answer, from the zone it replaces
            assert addresses(tcp(server.port, query("web.service.discovery"))) == old
            assert addresses(udp(server.port, query("web.service.discovery"))) == old
            assert not release.is_set() and len(builds) == 2  # one rebuild, not one per query
        finally:
            release.set()
        rebuild.join(5)
        assert addresses(tcp(server.port, query("web.service.discovery"))) == old | {"192.0.2.9"}
        assert len(builds) == 2


class Watched:
    """A lock that tells when a caller waits on it (it was held when asked)."""

    def __init__(self) -> None:
        self.lock, self.waiting = threading.Lock(), threading.Event()

    def acquire(self, blocking: bool = True) -> bool:
        if self.lock.acquire(blocking=False):
            return True
        if blocking:
            self.waiting.set()
        return self.lock.acquire(blocking=blocking)

    def release(self) -> None:
        self.lock.release()


def test_the_first_zone_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any zone is built there is nothing to answer from but "not loaded" (SERVFAIL):
    a query that comes while the first build runs waits for it."""
    catalog = make_catalog(WEB)
    real = Zone.from_catalog
    building, release = threading.Event(), threading.Event()

    def held(cat: Any, *args: Any) -> Zone:
        building.set()
        release.wait(10)
        return real(cat, *args)

    monkeypatch.setattr(Zone, "from_catalog", held)
    server = DnsServer(catalog, port=0)  # not started: its zone, as each query asks it
    server._building = watched = Watched()  # type: ignore[assignment]
    first = threading.Thread(target=server.zone, name="test-first-build", daemon=True)
    first.start()
    wait_until(building.is_set, 5, "the first build to start")
    zones: list[Zone] = []
    second = threading.Thread(target=lambda: zones.append(server.zone()), daemon=True)
    second.start()
    wait_until(watched.waiting.is_set, 5, "the second query to wait for the first build")
    assert not zones
    release.set()
    first.join(5)
    second.join(5)
    assert zones and zones[0].loaded and zones[0].index == catalog.index
