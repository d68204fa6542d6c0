"""Property tests: no request, however malformed, crashes the DNS endpoint or stops it answering.

``answer()`` is fed random bytes, valid queries (random names, types, EDNS), and valid queries
mutated (bytes flipped, cut short, garbage appended, counts changed, blown up to 64 KiB). It
must return ``None`` (drop) or a well-formed response for the same ID that dnslib can decode,
within the UDP size limit. Then the same kinds of packets are thrown at a real server over UDP
and TCP, and valid queries must still be answered correctly afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.lookup.dns import DnsServer
from discovery.lookup.dns_wire import DnsConfig, Zone, respond
from tests.harness.util import dns_tcp_reply
from tests.unit.test_dns import INSTANCES, make_catalog

ZONE = Zone(INSTANCES, 1)
CONFIG = DnsConfig()
NAMES = ["web.service.discovery", "blue.web.service.discovery", "_web._tcp.service.discovery",
         "db.service.discovery", "node2.node.discovery", "c0000204.addr.discovery",
         "discovery", "nope.service.discovery", "example.com", "WEB.service.DISCOVERY"]
QTYPES = ["A", "AAAA", "SRV", "SOA", "ANY", "MX", "TXT", "NS", "PTR", "AXFR"]
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=63)
names = st.one_of(st.sampled_from(NAMES),
                  st.lists(label, min_size=0, max_size=5).map(".".join),
                  st.lists(label, min_size=1, max_size=3).map(
                      lambda ls: ".".join([*ls, "service", "discovery"])))


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    question = DNSQuestion(draw(names) or ".", getattr(QTYPE, draw(st.sampled_from(QTYPES))))
    q = DNSRecord(DNSHeader(id=draw(st.integers(0, 0xFFFF)), rd=draw(st.booleans())), q=question)
    if draw(st.booleans()):
        q.add_ar(EDNS0(udp_len=draw(st.integers(0, 0xFFFF)), version=draw(st.sampled_from(
            [0, 0, 0, 1]))))
    return bytes(q.pack())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(queries()))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "append", "count", "insert", "huge"]))
        if how == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif how == "append":
            data += draw(st.binary(max_size=300))
        elif how == "count" and len(data) >= 12:
            struct.pack_into(">H", data, draw(st.sampled_from([4, 6, 8, 10])),
                             draw(st.integers(0, 0xFFFF)))
        elif how == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "huge":
            data += bytes([draw(st.integers(0, 255))]) * 65000
    return bytes(data)


packets = st.one_of(st.binary(max_size=600), queries(), mutated())


def check(data: bytes, tcp: bool = False) -> None:
    resp = respond(data, ZONE, CONFIG, tcp=tcp)
    if resp is None:
        assert len(data) < 12 or data[2] & 0x80  # we only drop what is no query at all
        return
    wire = resp.wire
    assert wire[:2] == data[:2]  # the same ID
    assert wire[2] & 0x80  # QR
    assert not wire[3] & 0x80  # never RA: no recursion
    assert len(wire) <= (65535 if tcp else 4096)
    qdcount = struct.unpack_from(">H", wire, 4)[0]
    end = 12
    if qdcount:  # the question comes back byte for byte
        while wire[end]:
            end += 1 + wire[end]
        end += 5
        assert wire[12:end] == data[12:end]
    # dnslib refuses labels that are not UTF-8 (legal in DNS): same-length stand-ins for it
    readable = wire[:12] + bytes(b if b < 0x80 else 0x78 for b in wire[12:end]) + wire[end:]
    parsed = DNSRecord.parse(readable)  # well-formed: an independent decoder agrees
    if not tcp and not any(QTYPE[r.rtype] == "OPT" for r in parsed.ar):
        assert len(wire) <= 512


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(make_catalog(INSTANCES), port=0) as srv:
        yield srv


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes(data: bytes) -> None:
    check(data)
    check(data, tcp=True)


@FUZZ
@given(queries())
def test_valid_queries(data: bytes) -> None:
    check(data)
    resp = respond(data, ZONE, CONFIG)
    assert resp is not None and resp.rcode in ("NOERROR", "NXDOMAIN", "REFUSED", "BADVERS")


@FUZZ
@given(mutated())
def test_mutated_queries(data: bytes) -> None:
    check(data)
    check(data, tcp=True)


def expect_web(reply: bytes, ident: int) -> None:
    r = DNSRecord.parse(reply)
    assert r.header.id == ident and RCODE[r.header.rcode] == "NOERROR"
    assert {str(rr.rdata) for rr in r.rr} == {"192.0.2.1", "192.0.2.2", "192.0.2.4"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(packets, min_size=1, max_size=20))
def test_server_keeps_answering(server: DnsServer, batch: list[bytes]) -> None:
    port = server.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        for data in batch:
            s.sendto(data[:65507], ("127.0.0.1", port))
        good = DNSRecord(DNSHeader(id=4242, rd=1), q=DNSQuestion("web.service.discovery"))
        s.sendto(good.pack(), ("127.0.0.1", port))
        while True:  # skip the replies to the batch; ours comes last (one thread, in order)
            reply = s.recv(65535)
            if reply[:2] == b"\x10\x92" and DNSRecord.parse(reply).q.qname.label == \
                    good.q.qname.label:
                break
        expect_web(reply, 4242)
    # TCP: the batch sent as one stream, whatever its framing; then a fresh valid connection
    with contextlib.suppress(OSError), \
            socket.create_connection(("127.0.0.1", port), timeout=2.0) as c:
        for data in batch:  # the server may hang up on a non-query: that is fine
            c.sendall(struct.pack(">H", min(len(data), 0xFFFF)) + data[:0xFFFF])
        c.sendall(b"\xff\xff" + b"\x00" * 100)  # promises more than it sends, then leaves
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as c:
        wire = bytes(good.pack())
        c.sendall(struct.pack(">H", len(wire)) + wire)
        expect_web(dns_tcp_reply(c), 4242)
