"""discovery.lookup.dns_wire and .dns: every name form, truncation, errors; a real server.

Requests are built and responses decoded with dnslib, an independent implementation.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from dataclasses import replace
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSQuestion, DNSRecord

from discovery.errors import ConfigError
from discovery.lookup import dns_zone
from discovery.lookup.dns import DnsServer, parse_listen
from discovery.lookup.dns_wire import DnsConfig, Zone, answer, respond
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot
from tests.harness.util import dns_tcp_reply, wait_for


def inst(service: str, n: int, address: str, port: int = 8080, node: str = "node1",
         **kw: Any) -> Instance:
    return Instance(service=service, id=f"{node}:{n:012x}:{port}", node=node, address=address,
                    port=port, **kw)


INSTANCES = [
    inst("web", 1, "192.0.2.1", 8080, tags=("blue", "v1")),
    inst("web", 2, "192.0.2.1", 8081, tags=("green",), weight=50),
    inst("web", 3, "192.0.2.2", 8080, node="node2", tags=("blue",)),
    inst("web", 4, "192.0.2.3", 8080, node="node2", state=State.DRAINING),
    inst("web", 5, "192.0.2.4", 8080, node="node2", tags=("green",)),  # node2's odd one out
    inst("web", 6, "192.0.2.2", 8082, node="node2", weight=0),
    inst("db", 7, "fd00::7", 5432, node="node3"),
    inst("mixed", 8, "192.0.2.8", 80, node="node4"),
    inst("mixed", 9, "fd00::9", 80, node="node4"),
    inst("gone", 10, "192.0.2.10", 80, node="node5", state=State.DRAINING),
]


def make_catalog(instances: list[Instance]) -> Catalog:
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in instances}, revision=1))
    return catalog


CATALOG = make_catalog(INSTANCES)
UNCAPPED = DnsConfig(udp_answer_limit=0)  # UDP answers limited by size only (see test_dns_abuse)


def query(name: str, qtype: str = "A", *, edns: int | None = None,
          version: int = 0) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, version=version))
    return bytes(q.pack())


def ask(name: str, qtype: str = "A", *, catalog: Catalog = CATALOG, tcp: bool = False,
        config: DnsConfig | None = None, edns: int | None = None) -> DNSRecord:
    wire = answer(query(name, qtype, edns=edns), catalog, config, tcp=tcp)
    assert wire is not None
    return DNSRecord.parse(wire)


def rdatas(records: list[Any], qtype: str | None = None) -> list[str]:
    return [str(r.rdata) for r in records if qtype is None or QTYPE[r.rtype] == qtype]


@pytest.mark.parametrize(("name", "qtype", "rcode", "expected"), [
    ("web.service.discovery", "A", "NOERROR", {"192.0.2.1", "192.0.2.2", "192.0.2.4"}),
    ("web.service.discovery.", "A", "NOERROR", {"192.0.2.1", "192.0.2.2", "192.0.2.4"}),
    ("WEB.Service.DISCOVERY", "A", "NOERROR", {"192.0.2.1", "192.0.2.2", "192.0.2.4"}),
    ("blue.web.service.discovery", "A", "NOERROR", {"192.0.2.1", "192.0.2.2"}),
    ("green.web.service.discovery", "A", "NOERROR", {"192.0.2.1", "192.0.2.4"}),
    ("v1.web.service.discovery", "A", "NOERROR", {"192.0.2.1"}),
    ("red.web.service.discovery", "A", "NXDOMAIN", set()),
    ("web.service.discovery", "AAAA", "NOERROR", set()),
    ("db.service.discovery", "AAAA", "NOERROR", {"fd00::7"}),
    ("db.service.discovery", "A", "NOERROR", set()),
    ("mixed.service.discovery", "A", "NOERROR", {"192.0.2.8"}),
    ("mixed.service.discovery", "AAAA", "NOERROR", {"fd00::9"}),
    ("mixed.service.discovery", "ANY", "NOERROR", {"192.0.2.8", "fd00::9"}),
    ("web.service.discovery", "MX", "NOERROR", set()),
    ("gone.service.discovery", "A", "NXDOMAIN", set()),  # only draining instances
    ("nope.service.discovery", "A", "NXDOMAIN", set()),
    ("node1.node.discovery", "A", "NOERROR", {"192.0.2.1"}),
    ("node2.node.discovery", "A", "NOERROR", {"192.0.2.2"}),  # most of its instances
    ("node3.node.discovery", "AAAA", "NOERROR", {"fd00::7"}),
    ("node3.node.discovery", "A", "NOERROR", set()),
    ("node5.node.discovery", "A", "NOERROR", {"192.0.2.10"}),  # draining: still its node
    ("nope.node.discovery", "A", "NXDOMAIN", set()),
    ("c0000204.addr.discovery", "A", "NOERROR", {"192.0.2.4"}),
    ("fd000000000000000000000000000007.addr.discovery", "AAAA", "NOERROR", {"fd00::7"}),
    ("c00002ff.addr.discovery", "A", "NXDOMAIN", set()),
    ("service.discovery", "A", "NOERROR", set()),
    ("node.discovery", "A", "NOERROR", set()),
    ("x.web.extra.service.discovery", "A", "NXDOMAIN", set()),
    # empty non-terminals: names exist below them (_web._tcp, _web._blue), for resolvers
    # that minimise query names (RFC 8020: NXDOMAIN would deny every name below)
    ("_tcp.service.discovery", "A", "NOERROR", set()),
    ("_blue.service.discovery", "SRV", "NOERROR", set()),
    ("_red.service.discovery", "A", "NXDOMAIN", set()),
    ("_udp.service.discovery", "A", "NXDOMAIN", set()),
    ("web.discovery", "A", "NXDOMAIN", set()),
    ("discovery", "A", "NOERROR", set()),
    ("example.com", "A", "REFUSED", set()),
    ("web.service.consul", "A", "REFUSED", set()),
    ("discovery.example.com", "A", "REFUSED", set()),
    (".", "NS", "REFUSED", set()),
])
def test_answers(name: str, qtype: str, rcode: str, expected: set[str]) -> None:
    r = ask(name, qtype)
    assert RCODE[r.header.rcode] == rcode
    assert set(rdatas(r.rr)) == expected
    assert len(rdatas(r.rr)) == len(expected)  # no duplicate addresses
    assert r.header.qr and not r.header.ra  # a response; no recursion, ever
    assert r.header.aa == (rcode != "REFUSED")
    assert str(r.q.qname).rstrip(".") == name.rstrip(".") or name == "."  # echoed, same case
    if rcode == "REFUSED":
        assert not r.rr and not r.auth and not r.ar
    elif not expected:  # NXDOMAIN or no data: the SOA in authority, for negative caching
        assert [QTYPE[a.rtype] for a in r.auth] == ["SOA"]
        assert str(r.auth[0].rname) == "discovery."
    for rr in r.rr:
        assert rr.ttl == 0
        assert str(rr.rname) == str(r.q.qname)


@pytest.mark.parametrize("name", ["_web._tcp.service.discovery", "web.service.discovery"])
def test_srv_with_targets_in_additional(name: str) -> None:
    r = ask(name, "SRV", config=UNCAPPED)
    srv = sorted((rr.rdata.port, rr.rdata.weight, str(rr.rdata.target)) for rr in r.rr)
    assert srv == [
        (8080, 100, "c0000204.addr.discovery."),  # not at its node's address
        (8080, 100, "node1.node.discovery."),
        (8080, 100, "node2.node.discovery."),
        (8081, 50, "node1.node.discovery."),
        (8082, 0, "node2.node.discovery."),
    ]
    assert all(rr.rdata.priority == 1 for rr in r.rr)
    glue = {str(rr.rname): str(rr.rdata) for rr in r.ar}
    assert glue == {"node1.node.discovery.": "192.0.2.1", "node2.node.discovery.": "192.0.2.2",
                    "c0000204.addr.discovery.": "192.0.2.4"}
    assert len(r.ar) == 3
    for target, address in glue.items():  # every target resolves on its own too
        assert rdatas(ask(target, "A").rr) == [address]


def test_srv_tag_forms_and_ipv6_glue() -> None:
    tagged = ask("_web._blue.service.discovery", "SRV")
    assert sorted(rr.rdata.port for rr in tagged.rr) == [8080, 8080]
    assert sorted(rr.rdata.port for rr in ask("blue.web.service.discovery", "SRV").rr) == \
        [8080, 8080]
    db = ask("_db._tcp.service.discovery", "SRV")
    assert [str(rr.rdata.target) for rr in db.rr] == ["node3.node.discovery."]
    assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in db.ar] == [("AAAA", "fd00::7")]


def test_apex_soa_and_custom_domain_and_ttl() -> None:
    soa = ask("discovery", "SOA").rr
    assert [QTYPE[rr.rtype] for rr in soa] == ["SOA"]
    assert str(soa[0].rdata.mname) == "ns.discovery."
    assert soa[0].rdata.times[0] == CATALOG.index % 2**32  # serial follows the catalog
    config = DnsConfig(domain="Consul.Example.", ttl=30)
    assert config.domain == "consul.example."
    r = ask("web.service.consul.example", "A", config=config)
    assert len(r.rr) == 3 and {rr.ttl for rr in r.rr} == {30}
    assert RCODE[ask("web.service.discovery", "A", config=config).header.rcode] == "REFUSED"
    nx = ask("nope.service.consul.example", "A", config=config)
    assert str(nx.auth[0].rname) == "consul.example." and nx.auth[0].ttl == 30


@pytest.mark.parametrize(("domain", "ttl"), [("", 0), ("a..b", 0), ("bad_label.", 0),
                                              ("x" * 64, 0), ("a." * 100, 0), ("ok.", -1),
                                              ("ok.", 2**31), ("ok.", True)])
def test_bad_config(domain: str, ttl: int) -> None:
    with pytest.raises(ConfigError):
        DnsConfig(domain, ttl)


def big_catalog(n: int) -> Catalog:
    return make_catalog([inst("big", i, f"198.51.{100 + i // 250}.{i % 250 + 1}", 80 + i,
                              node=f"n{i}") for i in range(n)])


def test_tc_bit_over_512_bytes_without_edns() -> None:
    catalog = big_catalog(40)  # 40 A records: 12 + 20 + 40 * 16 bytes > 512
    wire = answer(query("big.service.discovery"), catalog, UNCAPPED)
    assert wire is not None and len(wire) <= 512
    r = DNSRecord.parse(wire)
    assert r.header.tc and 0 < len(r.rr) < 40
    fits = answer(query("big.service.discovery", edns=4096), catalog, UNCAPPED)
    assert fits is not None and len(fits) > 512
    assert not DNSRecord.parse(fits).header.tc and len(DNSRecord.parse(fits).rr) == 40


def test_tc_bit_over_edns_size_and_tcp_in_full() -> None:
    catalog = big_catalog(300)  # 300 * 16 bytes: more than any UDP size we send
    for size in (600, 1232, 4096, 65000):
        wire = answer(query("big.service.discovery", edns=size), catalog, UNCAPPED)
        assert wire is not None and len(wire) <= min(size, 4096)
        r = DNSRecord.parse(wire)
        assert r.header.tc and r.ar and QTYPE[r.ar[-1].rtype] == "OPT"  # OPT kept
    small = DNSRecord.parse(answer(query("big.service.discovery", edns=100), catalog,
                                   UNCAPPED) or b"")
    assert small.header.tc and len(small.pack()) <= 512  # below 512 counts as 512
    full = ask("big.service.discovery", catalog=catalog, tcp=True)
    assert not full.header.tc and len(full.rr) == 300
    srv = ask("big.service.discovery", "SRV", catalog=catalog, tcp=True)
    assert len(srv.rr) == 300 and len(srv.ar) == 300


def test_additional_left_out_without_tc_when_answers_fit() -> None:
    catalog = big_catalog(12)  # 12 SRV fit in 512 bytes, their 12 targets' A records don't
    r = ask("big.service.discovery", "SRV", catalog=catalog, config=UNCAPPED)
    assert len(r.rr) == 12 and not r.header.tc
    assert 0 < len(r.ar) < 12 and len(r.pack()) <= 512


def test_malformed_requests() -> None:
    valid = query("web.service.discovery")
    assert answer(b"", CATALOG) is None
    assert answer(valid[:11], CATALOG) is None
    assert answer(bytes([valid[0], valid[1], valid[2] | 0x80]) + valid[3:], CATALOG) is None
    for bad in (valid[:-1], valid[:20], valid[:12], valid[:4] + b"\x00\x02" + valid[6:],
                valid[:4] + b"\x00\x00" + valid[6:], valid[:12] + b"\xc0\x0c\x00\x01\x00\x01",
                valid[:12] + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01",
                valid[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
                valid[:10] + b"\x00\x05" + valid[12:]):  # 5 additional records promised
        r = DNSRecord.parse(answer(bad, CATALOG) or b"")
        assert RCODE[r.header.rcode] == "FORMERR" and r.pack()[:2] == valid[:2]
    notify = valid[:2] + bytes([valid[2] | 0x20]) + valid[3:]  # opcode 4
    assert RCODE[DNSRecord.parse(answer(notify, CATALOG) or b"").header.rcode] == "NOTIMP"
    two_opts = DNSRecord.question("web.service.discovery")
    two_opts.add_ar(EDNS0())
    two_opts.add_ar(EDNS0())
    assert DNSRecord.parse(answer(two_opts.pack(), CATALOG) or b"").header.rcode == 1
    badvers = answer(query("web.service.discovery", edns=1232, version=1), CATALOG) or b""
    assert DNSRecord.parse(badvers).ar[0].ttl >> 24 == 1  # extended rcode 16 = BADVERS
    assert RCODE[ask("discovery", "AXFR").header.rcode] == "REFUSED"
    chaos = DNSRecord(q=DNSQuestion("version.bind", QTYPE.TXT, 3))
    assert RCODE[DNSRecord.parse(answer(chaos.pack(), CATALOG) or b"").header.rcode] == "REFUSED"


def test_no_unvalidated_label_reaches_an_answer() -> None:
    bad = inst("web", 99, "192.0.2.99", node="node9")
    object.__setattr__(bad, "node", "evil.node\x00")  # as if it had bypassed the model
    worse = inst("web", 98, "192.0.2.98", node="node8")
    object.__setattr__(worse, "address", "192.0.2.98\n")
    zone = Zone([*INSTANCES, bad, worse], 1)
    wire = respond(query("web.service.discovery", "SRV"), zone, DnsConfig(), tcp=True)
    assert wire is not None
    assert b"evil" not in wire.wire and b"\x00\x00\x00\x63" not in wire.wire
    assert len(DNSRecord.parse(wire.wire).rr) == 5


def test_rotation_and_zone_index() -> None:
    q = query("web.service.discovery")
    first = respond(q, Zone.from_catalog(CATALOG), DnsConfig())
    assert first is not None and first.rotations == 3 and first.rcode == "NOERROR"
    orders = set()
    for k in range(3):
        resp = respond(q, Zone.from_catalog(CATALOG), DnsConfig(), rotate=k)
        assert resp is not None
        orders.add(tuple(rdatas(DNSRecord.parse(resp.wire).rr)))
    assert len(orders) == 3


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8600", ("127.0.0.1", 8600)), ("127.0.0.1", ("127.0.0.1", 8600)),
    (":53", ("127.0.0.1", 53)), ("[::1]:8600", ("::1", 8600)), ("[::1]", ("::1", 8600)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost:53", "1.2.3.4:x", "1.2.3.4:70000", "[::1]x",
                                  "1.2.3.4:-1"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text)


# --- a real server on a free loopback port ----------------------------------------------


def udp(port: int, wire: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        return s.recv(65535)


def tcp(port: int, wire: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(struct.pack(">H", len(wire)) + wire)
        return dns_tcp_reply(s)


def test_server_udp_tcp_cache_and_hook() -> None:
    catalog = make_catalog(INSTANCES)
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def hook(qtype: str, rcode: str) -> None:
        with lock:
            seen.append((qtype, rcode))

    with DnsServer(catalog, port=0, on_query=hook) as server:
        assert server.port > 0
        q = DNSRecord.question("web.service.discovery")
        addresses = set()
        for ident in (1, 2, 3, 4):  # cache hits keep the request's id; orders rotate
            q.header.id = ident
            r = DNSRecord.parse(udp(server.port, q.pack()))
            assert r.header.id == ident and len(r.rr) == 3
            addresses.add(str(r.rr[0].rdata))
        assert len(addresses) == 3
        # the hook runs right after the reply is sent
        wait_for(lambda: len(seen) >= 4, 5, interval=0.01, message="four hook calls")
        assert set(seen) == {("A", "NOERROR")} and len(seen) == 4
        catalog.load(Snapshot({i.key: i for i in INSTANCES[:1]}))  # the catalog moves on:
        wait_for(lambda: rdatas(DNSRecord.parse(udp(server.port, q.pack())).rr)  # once the
                 == ["192.0.2.1"], 5, interval=0.01, message="rebuilt")  # rebuild wait ends
        big = big_catalog(300)
        catalog.load(Snapshot({i.key: i for i in big.instances()}))
        q = DNSRecord.question("big.service.discovery", "SRV")
        wait_for(lambda: DNSRecord.parse(udp(server.port, q.pack())).rr, 5, interval=0.01,
                 message="rebuilt")
        capped = DNSRecord.parse(udp(server.port, q.pack()))  # the UDP answer limit: 3, no TC
        assert len(capped.rr) == 3 and not capped.header.tc
        full = DNSRecord.parse(tcp(server.port, bytes(q.pack())))
        assert len(full.rr) == 300 and not full.header.tc
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00\x01", ("127.0.0.1", server.port))  # dropped: no answer at all
        assert len(DNSRecord.parse(udp(server.port, q.pack())).rr) == 3  # still answering
        assert ("NONE", "DROPPED") in seen
    assert server._threads == []


def test_server_survives_its_own_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken_hook(qtype: str, rcode: str) -> None:
        calls.append(rcode)
        raise RuntimeError("a metrics hook that fails")

    with DnsServer(make_catalog(INSTANCES), port=0, on_query=broken_hook) as server:
        q = DNSRecord.question("web.service.discovery")
        assert len(DNSRecord.parse(udp(server.port, q.pack())).rr) == 3
        assert len(DNSRecord.parse(udp(server.port, q.pack())).rr) == 3  # cached, hook again

        def boom(*args: Any, **kw: Any) -> None:
            raise ValueError("a bug in answering")

        monkeypatch.setattr("discovery.lookup.dns.respond", boom)
        other = DNSRecord.question("db.service.discovery", "AAAA")
        r = DNSRecord.parse(udp(server.port, other.pack()))
        assert RCODE[r.header.rcode] == "SERVFAIL" and r.header.id == other.header.id
        r = DNSRecord.parse(tcp(server.port, bytes(other.pack())))
        assert RCODE[r.header.rcode] == "SERVFAIL"
        monkeypatch.undo()
        assert DNSRecord.parse(udp(server.port, other.pack())).rr  # and on it goes
    assert calls[:2] == ["NOERROR", "NOERROR"] and "SERVFAIL" in calls


def test_tcp_several_queries_on_one_connection() -> None:
    with DnsServer(make_catalog(INSTANCES), port=0) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=2.0) as s:
        wires = [bytes(DNSRecord.question(n, t).pack()) for n, t in
                 (("web.service.discovery", "A"), ("db.service.discovery", "AAAA"),
                  ("nope.service.discovery", "A"))]
        s.sendall(b"".join(struct.pack(">H", len(w)) + w for w in wires))  # pipelined
        codes = []
        for wire in wires:
            r = DNSRecord.parse(dns_tcp_reply(s))
            assert r.pack()[:2] == wire[:2]
            codes.append(RCODE[r.header.rcode])
        assert codes == ["NOERROR", "NOERROR", "NXDOMAIN"]


def test_a_catalog_not_loaded_yet_is_servfail_not_nxdomain() -> None:
    """A watcher started while its registry is down has an empty catalog until its first
    read: every name was NXDOMAIN, which resolvers cache as "no such name" (its SOA's negative
    TTL). SERVFAIL says "ask again", as HTTP's 503 does; a name outside the domain is still
    REFUSED. Loaded, the names answer."""
    empty = Catalog()
    for name, qtype in [("web.service.discovery", "A"), ("_web._tcp.service.discovery", "SRV"),
                        ("nope.service.discovery", "A"), ("discovery", "SOA")]:
        reply = ask(name, qtype, catalog=empty)
        assert RCODE[reply.header.rcode] == "SERVFAIL" and not reply.rr, name
    assert RCODE[ask("example.com", catalog=empty).header.rcode] == "REFUSED"
    empty.load(Snapshot({i.key: i for i in INSTANCES}, revision=1))
    assert RCODE[ask("web.service.discovery", catalog=empty).header.rcode] == "NOERROR"


def test_a_zone_build_after_a_change_takes_only_the_service_that_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's next zone is the one before and the services changed since: the others'
    members are the same objects, no record of theirs is checked again, and one of the
    service's records unchanged in node and address is not checked again either (before: the
    whole catalog went through again, 1 s a build at 100,000 instances; the checks were kept
    from the zone before)."""
    web = [inst("web", n, "127.0.0.5", 8080 + n, node=f"w{n}") for n in range(3)]
    catalog = make_catalog([*web, *(inst("big", i, f"127.1.{i // 250}.{i % 250 + 1}", 80,
                                         node=f"n{i}") for i in range(300))])
    first = Zone.from_catalog(catalog)
    calls: list[tuple[str, ...]] = []
    real = dns_zone._checked
    monkeypatch.setattr(dns_zone, "_checked", lambda *key: calls.append(key) or real(*key))
    moved = replace(web[0], address="127.0.0.6")
    for change in (replace(web[1], weight=5), moved):  # one change each, then one zone
        catalog.apply(Change("put", change.key, change, revision=2))
    again = Zone.from_catalog(catalog, None, first)
    assert calls == [("web", "w0", "127.0.0.6")]
    assert again.services[b"big"] is first.services[b"big"]
    assert [m.instance for m in again.services[b"web"]] == [moved, replace(web[1], weight=5),
                                                            web[2]]
    assert again.nodes[b"w0"] == ipaddress.ip_address("127.0.0.6") and again.index == \
        catalog.index and first.nodes[b"w0"] == ipaddress.ip_address("127.0.0.5")
    assert Zone.from_catalog(catalog, None, again).services is not again.services  # a new map
