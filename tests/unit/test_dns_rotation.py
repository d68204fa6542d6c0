"""The order of UDP answers: each question goes round its windows (the UDP answer limit) on
its own, whatever else is asked and however often the catalog changes."""

from __future__ import annotations

from dnslib import DNSRecord

from discovery.lookup.dns import DnsServer
from discovery.registry.base import Snapshot
from tests.unit.test_dns import inst, make_catalog, rdatas, udp


def test_each_name_turns_through_its_windows_whatever_else_is_asked() -> None:
    """Two names of two UDP windows each (6 instances, 3 an answer), asked in turn: each
    still goes round its own windows (one counter for both served each name one window)."""
    catalog = make_catalog([inst(svc, n, f"198.51.100.{k * 10 + n}", node=f"n{n}")
                            for k, svc in enumerate(("left", "right")) for n in range(6)])
    with DnsServer(catalog, port=0) as server:
        seen: dict[str, set[frozenset[str]]] = {"left": set(), "right": set()}
        for _ in range(4):
            for svc in seen:
                r = DNSRecord.parse(udp(server.port, DNSRecord.question(
                    f"{svc}.service.discovery").pack()))
                seen[svc].add(frozenset(rdatas(r.rr)))
        assert {svc: len(windows) for svc, windows in seen.items()} == {"left": 2, "right": 2}


def test_a_name_goes_round_its_windows_though_the_catalog_changes_between_its_queries() -> None:
    """18 instances, 6 windows of 3; the catalog changes after every query (which clears the
    answer cache): the name's turn survives the clears and a miss takes its turn too, so every
    instance is served."""
    base = [inst("many", n, f"198.51.100.{n + 1}", node=f"n{n}") for n in range(18)]
    catalog = make_catalog(base)
    q = DNSRecord.question("many.service.discovery").pack()
    with DnsServer(catalog, port=0) as server:
        served: set[str] = set()
        for change in range(6):
            served |= set(rdatas(DNSRecord.parse(udp(server.port, q)).rr))
            extra = inst("other", 100 + change, "192.0.2.200", node="x")
            catalog.load(Snapshot({i.key: i for i in [*base, extra]}, revision=10 + change))
        assert len(served) == 18, sorted(served)
