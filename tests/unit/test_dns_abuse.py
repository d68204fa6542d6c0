"""The DNS endpoint under abuse (issue 8 §5): amplification, the cache key, TCP deadlines and caps.

Amplification is measured as response bytes / request bytes for minimal queries (the shortest
names that reach a big answer) at EDNS 4096, against a catalog of many instances with long node
names (the largest SRV targets). Servers run on free loopback ports; waits poll with deadlines.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord, EDNSOption

from discovery.errors import ConfigError
from discovery.lookup import dns
from discovery.lookup.dns import DnsServer
from discovery.lookup.dns_limits import (
    CACHE_BYTES,
    CACHE_ENTRIES,
    AnswerCache,
    TcpLimits,
    beyond_loopback,
)
from discovery.lookup.dns_packet import cache_key
from discovery.lookup.dns_wire import DnsConfig, Response, Zone, respond
from discovery.lookup.peers import client_of
from discovery.metrics import Metrics
from discovery.registry.base import Change
from tests.harness.util import dns_tcp_reply, wait_for
from tests.unit.test_dns import inst, make_catalog, query, tcp, udp

LONG = "n" * 55  # node names of 58..59 characters: SRV targets as long as they get
MANY = [
    *(inst("a", i, f"198.51.{100 + i // 250}.{i % 250 + 1}", 1000 + i, node=f"{LONG}{i:03d}")
      for i in range(300)),
    *(inst("a", 1000 + i, f"2001:db8::{i + 1:x}", 3000 + i, node=f"{LONG}6{i:03d}")
      for i in range(150)),
    *(inst("c", 2000 + i, f"203.0.113.{i + 1}", 80, node=f"c{i}") for i in range(150)),
]
ZONE = Zone(MANY, 1)
MINIMAL = [("a.service.discovery", "A"), ("a.service.discovery", "AAAA"),
           ("a.service.discovery", "SRV"), ("a.service.discovery", "ANY"),
           ("_a._tcp.service.discovery", "SRV"), ("b.service.discovery", "A"),
           ("discovery", "SOA"), ("discovery", "ANY")]


def ratio(request: bytes, response: bytes) -> float:
    return len(response) / len(request)


@pytest.mark.parametrize(("name", "qtype"), MINIMAL)
@pytest.mark.parametrize("edns", [None, 512, 1232, 4096])
def test_amplification_at_most_10x(name: str, qtype: str, edns: int | None) -> None:
    request = query(name, qtype, edns=edns)
    first = respond(request, ZONE, DnsConfig())
    assert first is not None
    for turn in range(first.rotations):  # every window the cache may serve
        resp = respond(request, ZONE, DnsConfig(), rotate=turn)
        assert resp is not None
        assert ratio(request, resp.wire) <= 10, (turn, len(resp.wire))
        parsed = DNSRecord.parse(resp.wire)
        assert not parsed.header.tc and len(parsed.rr) <= 3
    uncapped = respond(request, ZONE, DnsConfig(udp_answer_limit=0))  # what the limit prevents
    assert uncapped is not None
    if edns == 4096 and name.startswith("a."):
        assert ratio(request, uncapped.wire) > 30


def test_capped_windows_serve_every_instance_and_tcp_everything() -> None:
    request = query("c.service.discovery", "SRV", edns=4096)
    first = respond(request, ZONE, DnsConfig())
    assert first is not None and first.rotations == 50  # 150 instances, 3 at a time
    seen: set[str] = set()
    for turn in range(first.rotations):
        r = DNSRecord.parse(respond(request, ZONE, DnsConfig(), rotate=turn).wire)  # type: ignore[union-attr]
        targets = {str(rr.rdata.target) for rr in r.rr}
        assert {str(rr.rname) for rr in r.ar if QTYPE[rr.rtype] != "OPT"} == targets  # glue
        seen |= targets
    assert len(seen) == 150
    full = respond(request, ZONE, DnsConfig(), tcp=True)
    assert full is not None
    parsed = DNSRecord.parse(full.wire)
    assert len(parsed.rr) == 150 and len(parsed.ar) == 151 and not parsed.header.tc
    few = DNSRecord.parse(respond(query("c.service.discovery"), ZONE,  # type: ignore[union-attr]
                                  DnsConfig(udp_answer_limit=200)).wire)
    assert few.header.tc and len(few.rr) < 150  # a large limit: the 512-byte size still holds


@pytest.mark.parametrize("bad", [-1, 65536, True, "3", 2.5])
def test_bad_udp_answer_limit(bad: Any) -> None:
    with pytest.raises(ConfigError):
        DnsConfig(udp_answer_limit=bad)


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"timeout": 301}, {"per_client": 0},
                                 {"connections": 4, "per_client": 5}, {"connections": 5000}])
def test_bad_tcp_limits(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        TcpLimits(**bad)


def padded(name: str, qtype: str = "A", *, pad: int, edns: int | None = 4096,
           trailing: bytes = b"", ident: int = 1, do: bool = False) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns is not None:
        opts = [EDNSOption(12, os.urandom(pad))] if pad else []
        q.add_ar(EDNS0(udp_len=edns, opts=opts, flags="do" if do else ""))
    return bytes(q.pack()) + trailing


def test_cache_key_is_the_question_not_the_datagram() -> None:
    base = cache_key(padded("a.service.discovery", pad=0))
    assert base is not None and len(base) < 64
    for pad, trailing in ((1, b""), (400, b""), (0, os.urandom(300)), (2000, b"\x00" * 9)):
        assert cache_key(padded("a.service.discovery", pad=pad, trailing=trailing)) == base
    assert cache_key(padded("a.service.discovery", pad=8, ident=99, do=True)) == base
    assert cache_key(padded("a.service.discovery", pad=0, edns=65000)) == base  # clamped 4096
    assert cache_key(padded("A.SerVice.discovery", pad=0)) == base  # DNS 0x20: one question
    differ = [padded("b.service.discovery", pad=0), padded("a.service.discovery", "SRV", pad=0),
              padded("a.service.discovery", pad=0, edns=1232), query("a.service.discovery")]
    keys = {cache_key(d) for d in differ}
    assert len(keys) == 4 and base not in keys and None not in keys
    # the type's bytes are not a name's: type 65 (HTTPS, "A") is not type 97 ("a")
    https = padded("a.service.discovery", "HTTPS", pad=0)
    qtype_at = https.index(b"\x00", 12) + 1
    assert https[qtype_at:qtype_at + 2] == b"\x00\x41"
    assert cache_key(https) != cache_key(https[:qtype_at] + b"\x00\x61" + https[qtype_at + 2:])
    assert cache_key(query("a.service.discovery", edns=100)) == \
        cache_key(query("a.service.discovery", edns=512))  # below 512 counts as 512
    plain = query("a.service.discovery")
    for odd in (plain[:4] + b"\x00\x02" + plain[6:],  # two questions
                plain[:6] + b"\x00\x01" + plain[8:],  # an answer record
                query("a.service.discovery", edns=1232, version=1),
                padded("a.service.discovery", pad=10)[:-3],  # OPT cut short
                plain[:20], b"\x00" * 11):
        assert cache_key(odd) is None


def test_answer_cache_is_bounded_in_entries_and_bytes() -> None:
    resp = Response(b"\x00\x01" + b"x" * 500, "A", "NOERROR", 4)
    cache = AnswerCache(max_entries=10, max_bytes=1 << 20)
    for i in range(25):
        cache.put(b"k%d" % i, resp)
        assert len(cache) <= 10
    cache = AnswerCache(max_entries=1000, max_bytes=8000)
    for i in range(100):
        cache.put(b"k%d" % i, resp)
        assert cache.nbytes <= 8000
        tails = cache.entries[b"k%d" % i][0]
        cache.fill(tails, 1, b"y" * 4000)  # a later turn: kept only within the budget
        assert cache.nbytes <= 8000


def lockstep(port: int, requests: list[bytes], timeout: float = 2.0) -> list[bytes]:
    """Send each request and wait for its answer (one socket, in order)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for data in requests:
            s.sendto(data, ("127.0.0.1", port))
            out.append(s.recv(65535))
    return out


def test_padded_queries_do_not_grow_the_cache() -> None:
    with DnsServer(make_catalog(MANY), port=0) as server:
        requests = [padded("c.service.discovery", pad=n % 1400 + 1, trailing=os.urandom(n % 97),
                           ident=n) for n in range(400)]
        replies = lockstep(server.port, requests)
        for n, reply in enumerate(replies):
            r = DNSRecord.parse(reply)
            assert r.header.id == n and len(r.rr) == 3 and RCODE[r.header.rcode] == "NOERROR"
        entries, nbytes = server.cache_size()
        assert entries == 1 and nbytes < 64 << 10
        assert max(len(r) for r in replies) <= 10 * len(padded("c.service.discovery", pad=0))
        unique = [padded(f"x{n}.service.discovery", pad=1000, ident=n) for n in range(3000)]
        for reply in lockstep(server.port, unique):
            assert RCODE[DNSRecord.parse(reply).header.rcode] == "NXDOMAIN"
        entries, nbytes = server.cache_size()
        assert 1 < entries <= CACHE_ENTRIES and nbytes <= CACHE_BYTES
        assert nbytes < 3000 * 1000  # the padding is not what is kept


def test_names_in_any_case_are_one_cache_entry_each_answer_echoing_its_own() -> None:
    """A resolver that randomises its names' case (DNS 0x20: Unbound's use-caps-for-id) hits the
    cache, which it missed on every query while the key was the name as asked; each answer
    echoes the question as asked, which such a resolver checks."""
    with DnsServer(make_catalog(MANY), port=0) as server:
        names = ["c.service.discovery", "C.SERVICE.DISCOVERY", "c.SeRvIcE.dIsCoVeRy",
                 "C.service.Discovery"]
        replies = lockstep(server.port, [query(n, "SRV") for n in names])
        for name, reply in zip(names, replies, strict=True):
            r = DNSRecord.parse(reply)
            assert str(r.q.qname) == name + "."  # as asked, byte for byte
            assert RCODE[r.header.rcode] == "NOERROR" and len(r.rr) == 3
            assert {str(a.rname) for a in r.rr} == {name + "."}  # (points to the question)
        assert server.cache_size()[0] == 1


def test_udp_amplification_through_the_server() -> None:
    with DnsServer(make_catalog(MANY), port=0) as server:
        for name, qtype in MINIMAL:
            request = query(name, qtype, edns=4096)
            replies = lockstep(server.port, [request] * 60)  # cache hits, windows in turn
            assert max(ratio(request, r) for r in replies) <= 10, (name, qtype)
        full = DNSRecord.parse(tcp(server.port, query("a.service.discovery", "SRV")))
        assert len(full.rr) == 450 and not full.header.tc


def closed_at(sock: socket.socket, start: float, drip: bytes, every: float,
              timeout: float) -> tuple[float, int]:
    """Drip ``drip`` one byte per ``every`` s until the server hangs up: (when, bytes sent)."""
    sent = 0
    deadline = start + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                if sock.recv(1) == b"":
                    return time.monotonic() - start, sent
            except ConnectionError:
                return time.monotonic() - start, sent
        if sent < len(drip):
            try:
                sock.send(drip[sent:sent + 1])
            except ConnectionError:
                return time.monotonic() - start, sent
            sent += 1
    raise AssertionError(f"not cut within {timeout} s ({sent} bytes sent)")


def test_slow_tcp_is_cut_at_the_message_deadline() -> None:
    wire = query("c.service.discovery")
    message = struct.pack(">H", len(wire)) + wire
    with DnsServer(make_catalog(MANY), port=0, tcp_limits=TcpLimits(timeout=1.0)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            start = time.monotonic()
            when, sent = closed_at(s, start, message, every=0.1, timeout=6.0)
        assert 0.9 <= when <= 3.0 and sent < len(message)  # per read, it would never end
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            start = time.monotonic()  # idle, then a whole message late: cut as well
            when, _ = closed_at(s, start, b"", every=0.1, timeout=6.0)
        assert 0.9 <= when <= 3.0
        assert len(DNSRecord.parse(tcp(server.port, wire)).rr) == 150  # prompt: served


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0))


def hung_up(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0.05)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def asks(sock: socket.socket) -> bool:
    wire = query("c.service.discovery")
    sock.sendall(struct.pack(">H", len(wire)) + wire)
    return len(DNSRecord.parse(dns_tcp_reply(sock)).rr) == 150


def test_tcp_connections_capped_per_client_and_in_all(caplog: pytest.LogCaptureFixture) -> None:
    limits = TcpLimits(timeout=20.0, connections=5, per_client=3)
    with DnsServer(make_catalog(MANY), port=0, tcp_limits=limits) as server:
        open_ = [connect(server.port, "127.0.0.1") for _ in range(3)]
        try:
            extra = connect(server.port, "127.0.0.1")  # a 4th from the same address
            wait_for(lambda: hung_up(extra), 5, message="4th connection refused")
            extra.close()
            assert all(asks(s) for s in open_)  # the first three still served
            other = [connect(server.port, "127.0.0.2") for _ in range(2)]  # its own share
            open_ += other
            assert all(asks(s) for s in other)
            third = connect(server.port, "127.0.0.3")  # 5 in all: nobody else
            wait_for(lambda: hung_up(third), 5, message="6th connection refused")
            third.close()
            open_.pop(0).close()  # a slot frees up once the server sees the hang-up

            def served() -> bool:
                with connect(server.port, "127.0.0.1") as s:
                    return asks(s)

            assert wait_for(served, 5, message="a freed slot")
        finally:
            for s in open_:
                s.close()
    assert "tcp connection from 127.0.0.1 refused" in caplog.text


def test_client_of() -> None:
    assert client_of("192.0.2.7") == "192.0.2.7"
    assert client_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_of("2001:db8:1:2:3:4:5:6") == client_of("2001:db8:1:2::9") == \
        "2001:db8:1:2::/64"
    assert client_of("fe80::1%eth0") == "fe80::/64"


def test_warning_when_bound_beyond_loopback(caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert [beyond_loopback(a) for a in ("127.0.0.1", "127.0.0.2", "::1")] == [False] * 3
    assert all(beyond_loopback(a) for a in ("0.0.0.0", "::", "198.51.100.1", "192.0.2.1"))
    caplog.set_level(logging.INFO, logger="discovery.lookup.dns")
    with DnsServer(make_catalog(MANY), port=0):
        pass
    assert "beyond loopback" not in caplog.text
    # the check itself is above; here, that start() says it (without binding a real interface)
    monkeypatch.setattr("discovery.lookup.dns.beyond_loopback", lambda bind: True)
    with DnsServer(make_catalog(MANY), port=0):
        pass
    warned = [r for r in caplog.records if "beyond loopback" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING


def test_the_limit_reaches_the_server_from_start_lookups() -> None:
    from discovery.lookup.serve import start_lookups

    watcher: Any = SimpleNamespace(catalog=make_catalog(MANY))
    lookups = start_lookups(watcher, Metrics(), dns="127.0.0.1:0", dns_udp_answer_limit=1)
    try:
        assert lookups.dns_port
        reply = udp(lookups.dns_port, query("c.service.discovery", edns=4096))
        assert len(DNSRecord.parse(reply).rr) == 1
    finally:
        lookups.stop()


def test_a_storm_of_changes_rebuilds_the_zone_a_share_of_the_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One key written over and over (a put storm, anywhere in the catalog): every query
    used to rebuild the whole zone first, so DNS answered a few queries a second for every
    name. A rebuild now waits ``REBUILD_WAIT`` times the last one: the zone of a moment
    before answers meanwhile, and once the storm stops the next query has the last change."""
    catalog = make_catalog(MANY)
    server = DnsServer(catalog, port=0)  # not started: its zone, as each query asks it
    builds: list[float] = []
    real = Zone.from_catalog

    def slow(cat: Any, *args: Any) -> Zone:  # a big catalog's rebuild: 20 ms
        builds.append(time.monotonic())
        time.sleep(0.02)
        return real(cat, *args)

    monkeypatch.setattr(Zone, "from_catalog", slow)
    start, asked = time.monotonic(), 0
    while time.monotonic() - start < 1.0:  # changes and queries back to back for 1 s
        put = inst("web", asked % 7 + 1, "127.0.0.1", weight=asked % 100 + 1)
        catalog.apply(Change("put", put.key, put, revision=10 + asked))
        server.zone()
        asked += 1
    assert asked > 100 and 1 < len(builds) <= 1.0 / (0.02 * (1 + dns.REBUILD_WAIT)) + 2
    gaps = [b - a for a, b in itertools.pairwise(builds)]
    assert min(gaps) >= 0.02 * (1 + dns.REBUILD_WAIT) * 0.9, gaps
    wait_for(lambda: server.zone().index == catalog.index, 2, message="the last change")


def test_a_tcp_connection_that_gets_no_thread_is_closed_and_its_slot_kept_free(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """At the pids limit: the connection is closed, its slot given back, and the accept loop
    goes on (the error ended the loop: no TCP answer until a restart; the slot was lost)."""
    limits = TcpLimits(timeout=20.0, connections=1, per_client=1)
    with DnsServer(make_catalog(MANY), port=0, tcp_limits=limits) as server:
        class NoThread(threading.Thread):  # (defined before the patch: the real one's)
            def start(self) -> None:
                if self.name == "dns-tcp-conn" and not started:
                    started.append(self)
                    raise RuntimeError("can't start new thread")
                super().start()

        started: list[threading.Thread] = []
        monkeypatch.setattr("discovery.lookup.dns.threading.Thread", NoThread)
        first = connect(server.port, "127.0.0.1")
        wait_for(lambda: hung_up(first), 5, message="the connection without a thread closed")
        first.close()
        with connect(server.port, "127.0.0.1") as again:  # its one slot free, the loop alive
            assert asks(again)
    assert started and "dns: tcp connection from 127.0.0.1 closed" in caplog.text
