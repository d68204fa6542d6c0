"""UDP answers cut by the answer limit build only their window's records: the same bytes as when
every record of the name was built and then cut, at a cost that does not grow with the service.
TCP answers carry what fits 64 KiB, then TC (the figures docs/dns.md gives)."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import DNSRecord

from discovery.lookup import dns_wire, dns_zone
from discovery.lookup.dns_packet import AAAA, ANY, SOA, SRV, A, Labels, Record, Srv
from discovery.lookup.dns_wire import DnsConfig, respond
from discovery.lookup.dns_zone import IP, Member, Zone
from discovery.model import State
from tests.unit.test_dns import inst, query


def old_resolve(zone: Zone, rel: Labels, qtype: int) -> tuple[int, list[IP], list[Member], bool]:
    """How a name was resolved before (every time, nothing kept), written out another way."""
    n = len(rel)
    if n == 0:
        return dns_wire.NOERROR, [], [], qtype in (SOA, ANY)
    if rel in zone.parents or (n == 1 and rel[0] in (b"service", b"node", b"addr", b"zone")):
        return dns_wire.NOERROR, [], [], False
    svc, tag, where = b"", None, None
    if n == 2 and rel[1] in (b"node", b"addr"):
        ip = {b"node": zone.nodes, b"addr": zone.addrs}[rel[1]].get(rel[0])
        want = {A: 4, AAAA: 6}.get(qtype, 0 if qtype == ANY else -1)
        ips = [ip] if ip is not None and want in (0, ip.version) else []
        return (dns_wire.NXDOMAIN if ip is None else dns_wire.NOERROR), ips, [], False
    if rel[-1] == b"service" and n == 2:
        svc = rel[0]
    elif rel[-1] == b"service" and n == 3 and rel[0].startswith(b"_") and rel[1].startswith(b"_"):
        svc, tag = rel[0][1:], (None if rel[1] == b"_tcp" else rel[1][1:])
    elif rel[-1] == b"service" and n == 3:
        svc, tag = rel[1], rel[0]
    elif rel[-1] == b"zone" and n == 3:
        svc, where = rel[0], rel[1].decode()
    found = [m for m in zone.services.get(svc, []) if (tag is None or tag.decode() in
             m.instance.tags) and (where is None or m.instance.zone == where)]
    if not found:
        return dns_wire.NXDOMAIN, [], [], False
    if qtype == SRV:
        return dns_wire.NOERROR, [], found, False
    fams = {A: (4,), AAAA: (6,), ANY: (4, 6)}.get(qtype, ())
    ips = [ip for ip in dict.fromkeys(m.ip for m in found) if ip.version in fams]
    return dns_wire.NOERROR, ips, [], False


def old_answers(zone: Zone, rel: Labels, qtype: int, config: DnsConfig, cap: int,
                rotate: int) -> tuple[int, list[Record], list[Record], int]:
    """The algorithm before: every record of the name built, then turned round or cut."""
    rcode, ips, members, soa = old_resolve(zone, rel, qtype)
    domain = config.labels
    records: list[Record] = [(None, SOA, dns_wire._soa(zone, domain, config.ttl))] * soa
    records += [(None, A if ip.version == 4 else AAAA, ip.packed) for ip in ips]
    records += [(None, SRV, Srv(m.instance.weight, m.instance.port, m.target + domain))
                for m in members]
    address = {m.target + domain: m.ip for m in members}
    n = len(records)
    if cap and n > cap:
        rotations = min(-(-n // cap), dns_wire.MAX_WINDOWS)
        start = (rotate % rotations) * n // rotations
        records = (records[start:] + records[:start])[:cap]
    else:
        rotations = min(n, dns_wire.MAX_ROTATIONS) if n > 1 else 1
        records = records[rotate % rotations:] + records[:rotate % rotations]
    glue = dict.fromkeys(r[2].target for r in records if isinstance(r[2], Srv))
    return rcode, records, [(t, A if address[t].version == 4 else AAAA, address[t].packed)
                            for t in glue], rotations


def instances(size: int, name: str) -> Iterator[Any]:
    """``size`` instances of ``name``: IPv4 and IPv6, two instances an address (several a
    node, some not on their node's address), tags and zones, a few not up."""
    for n in range(size):
        address = f"10.{size % 250}.{n // 500}.{(n // 2) % 250}" if n % 7 else f"fd00::{n // 2:x}"
        yield inst(name, n, address, 8000 + n % 5, node=f"{name}-h{n // 3}",
                   tags=(("blue",) if n % 2 else ()) + (("v1",) if n % 3 == 0 else ()),
                   zone=("az1", "az2", "")[n % 3], weight=n % 4 * 10,
                   state=State.DRAINING if n % 11 == 5 else State.UP)


SIZES = (1, 2, 3, 4, 7, 31, 2500)
NAMES = ("{s}.service", "_{s}._tcp.service", "blue.{s}.service", "_{s}._v1.service",
         "{s}.az1.zone", "{s}-h0.node", "nosuch.{s}.service", "")
ZONE = Zone([i for size in SIZES for i in instances(size, f"s{size}")], index=7)


@pytest.mark.parametrize("limit", [3, 1, 0])
def test_the_bytes_are_those_of_every_record_built_then_cut(
        limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """For every size, name form, type, turn and transport: byte for byte the answer of old."""
    cases = 0
    for size, form, qtype, edns in itertools.product(
            SIZES, NAMES, ("A", "AAAA", "ANY", "SRV", "TXT", "SOA"), (None, 512, 4096)):
        config = DnsConfig(udp_answer_limit=limit)
        data = query(f"{form.format(s=f's{size}')}.discovery".lstrip("."), qtype, edns=edns)
        tcp = edns == 512  # (TCP ignores the EDNS size)
        turns = [*range(9), 1023, 1024, 5000] if size < 2500 or form == NAMES[0] else [9]
        for rotate in turns:
            new = respond(data, ZONE, config, tcp=tcp, rotate=rotate)
            with monkeypatch.context() as m:
                m.setattr(dns_wire, "_answers", old_answers)
                old = respond(data, ZONE, config, tcp=tcp, rotate=rotate)
            assert new == old, (size, form, qtype, tcp, edns, rotate)
            cases += 1
    assert cases > 4000


def test_the_lists_a_zone_keeps_give_the_answers_of_a_fresh_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A zone keeps each name's addresses or members for the next query, and clears them when
    they are too many: the answers are those of a zone that kept nothing."""
    monkeypatch.setattr(dns_zone, "LIST_ENTRIES", 3)
    members = [i for size in (5, 40) for i in instances(size, f"s{size}")]
    zone = Zone(members)
    for rotate, form, qtype in itertools.product(range(3), NAMES[:5], ("A", "SRV", "ANY")):
        data = query(f"{form.format(s='s40')}.discovery", qtype)
        assert respond(data, zone, DnsConfig(), rotate=rotate) == \
            respond(data, Zone(members), DnsConfig(), rotate=rotate)
    assert 0 < len(zone._lists) <= 3


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many SRV records are built and addresses written (``packed`` read) from here on."""
    counts = {"srv": 0, "address": 0}

    class CountedSrv(Srv):
        def __new__(cls, *args: Any) -> CountedSrv:
            counts["srv"] += 1
            return super().__new__(cls, *args)

    def counted(kind: type[IP]) -> property:
        packed = vars(kind)["packed"]

        def read(self: IP) -> bytes:
            counts["address"] += 1
            return bytes(packed.__get__(self))
        return property(read)

    monkeypatch.setattr(dns_wire, "Srv", CountedSrv)
    for kind in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        monkeypatch.setattr(kind, "packed", counted(kind))
    return counts


@pytest.mark.parametrize("size", [30, 300, 3000])
def test_a_udp_answer_builds_only_its_window_whatever_the_size(size: int,
                                                              built: dict[str, int]) -> None:
    """3 records (and at most 3 addresses of SRV targets) an answer, for 30 instances as for
    3,000 (before: every instance's record was built, then all but 3 thrown away)."""
    zone = Zone([inst("big", n, f"10.1.{n // 250}.{n % 250}", node=f"h{n}") for n in range(size)]
                + [inst("big", size + n, f"fd00::{n + 1:x}", node=f"h6{n}") for n in range(size)])
    for qtype in ("A", "AAAA", "ANY", "SRV"):
        for rotate in range(20):
            before = dict(built)
            resp = respond(query("big.service.discovery", qtype), zone, DnsConfig(), rotate=rotate)
            assert resp is not None and len(DNSRecord.parse(resp.wire).rr) == 3
            assert built["srv"] - before["srv"] == (3 if qtype == "SRV" else 0), qtype
            assert built["address"] - before["address"] == 3, qtype
    tcp = respond(query("big.service.discovery", "A"), zone, DnsConfig(), tcp=True)
    assert tcp is not None and len(DNSRecord.parse(tcp.wire).rr) == size  # TCP: every one


@pytest.mark.parametrize(("qtype", "family", "expected"), [
    ("A", 4, 4093), ("AAAA", 6, 2339), ("SRV", 4, 1527), ("SRV", 6, 977)])
def test_a_tcp_answer_is_what_fits_64_kib_then_tc(qtype: str, family: int, expected: int) -> None:
    """The figures docs/dns.md gives, for 5,000 instances over TCP: SRV targets
    ``host<n>.node`` (IPv4), or ``<32 hex digits>.addr`` (IPv6, off their node's address)."""
    zone = Zone([inst("web", n, f"10.0.{n // 250}.{n % 250}" if family == 4 else f"fd00::{n:x}",
                      node=f"host{n}") for n in range(5000)]
                + [inst("other", n, "192.0.2.1", node=f"host{n}") for n in range(5000)
                   if family == 6])  # the nodes' address: IPv4
    resp = respond(query("web.service.discovery", qtype), zone, DnsConfig(), tcp=True)
    assert resp is not None and len(resp.wire) <= 65535
    r = DNSRecord.parse(resp.wire)
    assert (r.header.tc, len(r.rr), len(r.ar)) == (1, expected, 0)
