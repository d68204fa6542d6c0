"""DNS messages at the byte level: the question parser, the response writer, the cache key.

No names, zones or catalogs here (that is :mod:`discovery.lookup.dns_wire`): only how a request
is read (:func:`parse`), how records are appended to a response within a size limit
(:class:`Writer`), and :func:`cache_key`, what a cached UDP response may be found by.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from discovery.errors import DiscoveryError

A, NS, SOA, AAAA, SRV, OPT, IXFR, AXFR, ANY = 1, 2, 6, 28, 33, 41, 251, 252, 255
CLASS_IN = 1
UDP_MIN, UDP_MAX, TCP_MAX = 512, 4096, 65535  # UDP_MAX: our OPT's size, the most we send
KEY_FLAGS = 0xF910  # QR, opcode, RD, CD: the request flags a response depends on

Labels = tuple[bytes, ...]


class Srv(NamedTuple):
    weight: int
    port: int
    target: Labels


class Soa(NamedTuple):
    mname: Labels
    rname: Labels
    timers: bytes


Record = tuple[Labels | None, int, "bytes | Srv | Soa"]  # owner (None: the qname), type, rdata
HEADER = struct.Struct(">HHHHHH")
RR = struct.Struct(">HHIH")


class FormErr(DiscoveryError):
    """Internal: the request cannot be read (answered FORMERR); never leaves the DNS modules."""


@dataclass
class Query:
    ident: int
    flags: int
    qend: int  # offset just past the question (name, type, class)
    labels: Labels  # lowercased
    qtype: int
    qclass: int
    edns: int | None = None  # the client's UDP payload size, when it sent an OPT record
    edns_version: int = 0


def parse(data: bytes, qdcount: int) -> Query:
    if qdcount != 1:
        raise FormErr
    n, pos, labels, size = len(data), 12, [], 1
    while True:
        if pos >= n:
            raise FormErr
        length = data[pos]
        if length == 0:
            pos += 1
            break
        size += length + 1
        if length > 63 or pos + 1 + length > n or size > 255:  # no pointers in a question
            raise FormErr
        labels.append(data[pos + 1:pos + 1 + length].lower())
        pos += 1 + length
    if pos + 4 > n:
        raise FormErr
    ident, flags, _, ancount, nscount, arcount = HEADER.unpack_from(data)
    qtype, qclass = struct.unpack_from(">HH", data, pos)
    q = Query(ident, flags, pos + 4, tuple(labels), qtype, qclass)
    pos = q.qend
    for i in range(ancount + nscount + arcount):
        opt = i >= ancount + nscount and pos < n and data[pos] == 0
        pos = skip_name(data, pos)
        if pos + 10 > n:
            raise FormErr
        rtype, rclass, rttl, rdlen = RR.unpack_from(data, pos)
        pos += 10 + rdlen
        if pos > n:
            raise FormErr
        if rtype == OPT:
            if not opt or q.edns is not None:  # not at the root, or a second one
                raise FormErr
            q.edns, q.edns_version = rclass, (rttl >> 16) & 0xFF
    return q


def skip_name(data: bytes, pos: int) -> int:
    while pos < len(data):
        length = data[pos]
        if length == 0 or length & 0xC0 == 0xC0:  # the end, or a compression pointer
            end = pos + (1 if length == 0 else 2)
            if end <= len(data):
                return end
            break
        if length > 63:
            break
        pos += 1 + length
    raise FormErr


class Writer:
    """A response being built: question copied, names compressed, records rolled back if big."""

    def __init__(self, head: bytes, qlabels: Labels) -> None:
        self.buf = bytearray(head)
        self.names: dict[Labels, int] = {}
        offset = 12
        for i, label in enumerate(qlabels):
            self.names[qlabels[i:]] = offset
            offset += 1 + len(label)

    def name(self, labels: Labels, compress: bool = True) -> None:
        for i in range(len(labels)):
            suffix = labels[i:]
            where = self.names.get(suffix)
            if where is not None and compress:
                self.buf += struct.pack(">H", 0xC000 | where)
                return
            if where is None and len(self.buf) < 0x3FFF:
                self.names[suffix] = len(self.buf)
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)

    def records(self, records: Sequence[Record], ttl: int,
                limit: int, edns: bool, required: bool) -> tuple[int, bool]:
        """Append what fits in ``limit``; (count, truncated?). Only required ones set TC."""
        reserve = 11 if edns else 0
        for count, (owner, rtype, rdata) in enumerate(records):
            mark = len(self.buf)
            self._record(owner, rtype, rdata, ttl)
            if len(self.buf) + reserve > limit:
                del self.buf[mark:]
                self.names = {k: o for k, o in self.names.items() if o < mark}
                return count, required
        return len(records), False

    def _record(self, owner: Labels | None, rtype: int, rdata: bytes | Srv | Soa,
                ttl: int) -> None:
        if owner is None:
            self.buf += b"\xc0\x0c"  # the question's name
        else:
            self.name(owner)
        self.buf += RR.pack(rtype, CLASS_IN, ttl, 0)
        start = len(self.buf)
        if isinstance(rdata, Srv):
            self.buf += struct.pack(">HHH", 1, rdata.weight, rdata.port)
            self.name(rdata.target, compress=False)  # RFC 2782: never compressed
        elif isinstance(rdata, Soa):
            self.name(rdata.mname)
            self.name(rdata.rname)
            self.buf += rdata.timers
        else:
            self.buf += rdata
        struct.pack_into(">H", self.buf, start - 2, len(self.buf) - start)

    def finish(self, q: Query, rcode: int, aa: bool, tc: int,
               counts: tuple[int, int, int] = (0, 0, 0)) -> bytes:
        an, ns, ar = counts
        if q.edns is not None:
            self.buf += b"\x00" + RR.pack(OPT, UDP_MAX, (rcode >> 4) << 24, 0)
            ar += 1
        flags = 0x8000 | (0x0400 if aa else 0) | tc | (q.flags & 0x0110) | (rcode & 0xF)
        self.buf[:12] = HEADER.pack(q.ident, flags, 1, an, ns, ar)
        return bytes(self.buf)


def cache_key(data: bytes) -> bytes | None:
    """What a UDP response to ``data`` depends on, besides the ID and the zone: the question
    (name in lower case, type, class), the flags echoed, and the UDP size the client's EDNS OPT
    allows (clamped to 512..4096, as answering does). Nothing else of the datagram: padding,
    EDNS options and trailing bytes are left out, so they cannot multiply cache entries.

    ``None`` when the request is not a plain query (no single question, other records than one
    OPT right after it, EDNS version > 0, …): such requests are answered but never cached.
    """
    n = len(data)
    if n < 17 or data[4:11] != b"\x00\x01\x00\x00\x00\x00\x00" or data[11] > 1:
        return None
    pos = 12
    while True:
        length = data[pos]
        if length == 0:
            break
        if length > 63:
            return None
        pos += 1 + length
        if pos >= n:
            return None
    qend = pos + 5
    if qend > n:
        return None
    flags = (data[2] << 8 | data[3]) & KEY_FLAGS
    if not data[11]:
        size = 0
    else:  # exactly one OPT at the root, right after the question, version 0, whole
        if qend + 11 > n or data[qend] != 0 or data[qend + 1:qend + 3] != b"\x00\x29" or \
                data[qend + 6] != 0 or qend + 11 + (data[qend + 9] << 8 | data[qend + 10]) > n:
            return None
        size = max(UDP_MIN, min(data[qend + 3] << 8 | data[qend + 4], UDP_MAX))
    name = pos + 1  # (names in any case are one question: :func:`echo` puts the asker's back)
    return struct.pack(">HH", flags, size) + data[12:name].lower() + data[name:qend]


def echo(data: bytes, key: bytes, tail: bytes) -> bytes:
    """The cached response ``tail`` (past its ID) to the request ``data`` of ``key``, with the
    request's ID and its question name as it was asked: a resolver that randomises the case of
    its names (DNS 0x20) takes only an answer that echoes them; everything that names it in
    the response points to the question (compression), so it follows."""
    n = len(key) - 8  # (flags and size, then the name, type and class)
    return data[:2] + tail[:10] + data[12:12 + n] + tail[10 + n:]
