"""DNS answers from the catalog, in wire format: parsing and encoding only, no sockets.

Names (case-insensitive) under the domain: ``[<tag>.]<service>.service`` and
``_<service>._tcp|_<tag>.service`` (A/AAAA of the instances that are up, SRV with the targets'
addresses as additional records), ``<node>.node``, ``<hex address>.addr`` (SRV targets off
their node's address), and the apex (SOA). Unknown names: NXDOMAIN, no record of that type:
NOERROR; both with the SOA as authority. Outside the domain: REFUSED. UDP answers fit 512 bytes
or the client's EDNS size (at most 4096): answer records that do not fit set TC, additional ones
are just left out (RFC 2181 §9). TCP answers are complete. See docs/dns.md.

Every label in an answer is built from values validated here again (``validate.dns_label``,
``validate.address``); nothing from the registry reaches the wire unchecked.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from discovery.errors import ConfigError, ValidationError
from discovery.model import Instance, State
from discovery.model import validate as v
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

A, NS, SOA, AAAA, SRV, OPT, IXFR, AXFR, ANY = 1, 2, 6, 28, 33, 41, 251, 252, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
UDP_MIN, UDP_MAX, TCP_MAX = 512, 4096, 65535  # UDP_MAX: our OPT's size, the most we send
MAX_ROTATIONS = 8
SOA_TIMERS = (3600, 600, 86400)  # refresh, retry, expire
MAX_DOMAIN = 180  # so that <63-char node>.node.<domain> stays under 255 bytes

#: Labels for metrics (bounded sets): other query types are "OTHER"; "NONE" = no question.
QTYPE_NAMES = {A: "A", NS: "NS", 5: "CNAME", SOA: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
               AAAA: "AAAA", SRV: "SRV", 65: "HTTPS", IXFR: "IXFR", AXFR: "AXFR", ANY: "ANY"}
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
               NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Labels = tuple[bytes, ...]


class _Srv(NamedTuple):
    weight: int
    port: int
    target: Labels


class _Soa(NamedTuple):
    mname: Labels
    rname: Labels
    timers: bytes


_Record = tuple[Labels | None, int, "bytes | _Srv | _Soa"]  # owner (None: the qname), type, rdata
_HEADER = struct.Struct(">HHHHHH")
_RR = struct.Struct(">HHIH")


@dataclass(frozen=True)
class DnsConfig:
    """The zone's domain (normalised: lowercase, trailing dot) and the TTL of every record."""

    domain: str = "discovery."
    ttl: int = 0

    def __post_init__(self) -> None:
        domain = str(self.domain).strip().lower().rstrip(".")
        if not domain or len(domain) > MAX_DOMAIN:
            raise ConfigError(f"dns domain {self.domain!r}: must be 1..{MAX_DOMAIN} characters")
        try:
            for label in domain.split("."):
                v.dns_label("dns domain", label)
        except ValidationError as exc:
            raise ConfigError(f"dns domain {self.domain!r}: {exc.reason}") from None
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or \
                not 0 <= self.ttl <= 2**31 - 1:
            raise ConfigError(f"dns ttl {self.ttl!r}: must be an integer in 0..2147483647")
        object.__setattr__(self, "domain", domain + ".")

    @property
    def labels(self) -> Labels:
        return tuple(label.encode() for label in self.domain.rstrip(".").split("."))


@dataclass(frozen=True)
class Member:
    """An instance as the DNS sees it: validated address and SRV target (relative labels)."""

    instance: Instance
    ip: IP
    target: Labels


class Zone:
    """Everything the answers come from, built once per catalog index."""

    def __init__(self, instances: Iterable[Instance], index: int = 0) -> None:
        self.index = index
        self.services: dict[bytes, list[Member]] = {}  # up instances only, sorted by id
        self.nodes: dict[bytes, IP] = {}
        checked = ((inst, _checked(inst.service, inst.node, inst.address)) for inst in instances)
        valid = [(inst, ip) for inst, ip in checked if ip is not None]
        self.addrs = {ip.packed.hex().encode(): ip for _, ip in valid}
        seen: dict[bytes, Counter[IP]] = {}
        for inst, ip in valid:
            seen.setdefault(inst.node.encode(), Counter())[ip] += 1
        for node, counts in seen.items():  # most instances' address; ties: the lowest
            self.nodes[node] = _most_common(counts)
        for inst, ip in valid:
            if inst.state is not State.UP:
                continue
            node = inst.node.encode()
            target = (node, b"node") if self.nodes[node] == ip else \
                (ip.packed.hex().encode(), b"addr")
            self.services.setdefault(inst.service.encode(), []).append(Member(inst, ip, target))
        for members in self.services.values():
            members.sort(key=lambda m: m.instance.id)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Zone:
        index = catalog.index  # read first: the data is at least this new
        return cls(catalog.instances(), index)

    def members(self, service: bytes, tag: bytes | None) -> list[Member]:
        found = self.services.get(service, [])
        if tag is None:
            return found
        return [m for m in found if tag.decode("ascii", "replace") in m.instance.tags]


@dataclass(frozen=True)
class Response:
    wire: bytes
    qtype: str
    rcode: str
    rotations: int = 1  # how many distinct answer orders (``rotate``) are worth caching


class _FormErr(Exception):
    pass


@dataclass
class _Query:
    ident: int
    flags: int
    qend: int  # offset just past the question (name, type, class)
    labels: Labels  # lowercased
    qtype: int
    qclass: int
    edns: int | None = None  # the client's UDP payload size, when it sent an OPT record
    edns_version: int = 0


def answer(request: bytes, catalog: Catalog, config: DnsConfig | None = None, *,
           tcp: bool = False) -> bytes | None:
    """The wire-format response to one request; ``None`` means: drop it, send nothing."""
    resp = respond(request, Zone.from_catalog(catalog), config or DnsConfig(), tcp=tcp)
    return None if resp is None else resp.wire


def respond(data: bytes, zone: Zone, config: DnsConfig, *, tcp: bool = False,
            rotate: int = 0) -> Response | None:
    """Answer ``data`` from ``zone``. ``rotate`` turns the answer records round by that many."""
    data = bytes(data)
    if len(data) < 12 or data[2] & 0x80:  # no header, or a response: never answer those
        return None
    ident, flags, qdcount = struct.unpack_from(">HHH", data)
    if (flags >> 11) & 0xF:
        return _bare(ident, flags, NOTIMP)
    try:
        q = _parse(data, qdcount)
    except _FormErr:
        return _bare(ident, flags, FORMERR)
    qtype = QTYPE_NAMES.get(q.qtype, "OTHER")
    out = _Writer(data[:q.qend], q.labels)
    if q.edns is not None and q.edns_version > 0:
        return Response(out.finish(q, BADVERS, False, 0), qtype, "BADVERS")
    limit = TCP_MAX if tcp else max(UDP_MIN, min(q.edns or 0, UDP_MAX))
    domain = config.labels
    if q.qclass not in (CLASS_IN, ANY) or q.labels[-len(domain):] != domain \
            or q.qtype in (AXFR, IXFR):
        return Response(out.finish(q, REFUSED, False, 0), qtype, "REFUSED")
    rel = q.labels[:-len(domain)]
    rcode, ips, members, soa = _resolve(zone, rel, q.qtype)
    records: list[_Record] = []
    extra: list[_Record] = []
    ttl = config.ttl
    if soa:
        records.append((None, SOA, _soa(zone, domain, ttl)))
    for ip in ips:
        records.append((None, A if ip.version == 4 else AAAA, ip.packed))
    if members:
        targets: dict[Labels, IP] = {}
        for m in members:
            target = m.target + domain
            targets.setdefault(target, m.ip)
            records.append((None, SRV, _Srv(m.instance.weight, m.instance.port, target)))
        extra = [(t, A if ip.version == 4 else AAAA, ip.packed) for t, ip in targets.items()]
    rotations = min(len(records), MAX_ROTATIONS) if len(records) > 1 else 1
    k = rotate % rotations
    records = records[k:] + records[:k]
    auth: list[_Record] = [] if records else [(domain, SOA, _soa(zone, domain, ttl))]
    edns = q.edns is not None
    an, tc = out.records(records, ttl, limit, edns, required=True)
    ns, tc = (0, tc) if tc else out.records(auth, ttl, limit, edns, required=True)
    ar = 0 if tc else out.records(extra, ttl, limit, edns, required=False)[0]
    wire = out.finish(q, rcode, True, 0x0200 if tc else 0, (an, ns, ar))
    return Response(wire, qtype, RCODE_NAMES[rcode], rotations)


def _resolve(zone: Zone, rel: Labels, qtype: int) -> tuple[int, list[IP], list[Member], bool]:
    """(rcode, addresses, SRV members, SOA?) for a name relative to the domain."""
    if not rel:
        return NOERROR, [], [], qtype in (SOA, ANY)
    kind, n = rel[-1], len(rel)
    if n == 1 and kind in (b"service", b"node", b"addr"):
        return NOERROR, [], [], False  # empty non-terminals
    found: list[Member] = []
    ip: IP | None = None
    if kind == b"service" and n == 2:
        found = zone.members(rel[0], None)
    elif kind == b"service" and n == 3 and rel[0][:1] == b"_" and rel[1][:1] == b"_":
        found = zone.members(rel[0][1:], None if rel[1] == b"_tcp" else rel[1][1:])
    elif kind == b"service" and n == 3:
        found = zone.members(rel[1], rel[0])
    elif kind == b"node" and n == 2:
        ip = zone.nodes.get(rel[0])
    elif kind == b"addr" and n == 2:
        ip = zone.addrs.get(rel[0])
    if ip is not None:
        return NOERROR, _pick([ip], qtype), [], False
    if not found:
        return NXDOMAIN, [], [], False
    if qtype == SRV:
        return NOERROR, [], found, False
    return NOERROR, _pick(dict.fromkeys(m.ip for m in found), qtype), [], False


@functools.lru_cache(maxsize=1 << 16)
def _checked(service: str, node: str, address: str) -> IP | None:
    """The address, if service, node and address may be written into an answer."""
    try:
        v.dns_label("service", service)
        v.dns_label("node", node)
        return ipaddress.ip_address(v.address("address", address))
    except (ValidationError, ValueError) as exc:
        log.debug("dns: %s/%s/%s left out: %s", service[:64], node[:64], address[:64], exc)
        return None


def _most_common(counts: Counter[IP]) -> IP:
    top = max(counts.values())
    return min((ip for ip, c in counts.items() if c == top), key=lambda ip: (ip.version, ip))


def _pick(ips: Iterable[IP], qtype: int) -> list[IP]:
    want = {A: (4,), AAAA: (6,), ANY: (4, 6)}.get(qtype, ())
    return [ip for ip in ips if ip.version in want]


def _soa(zone: Zone, domain: Labels, ttl: int) -> _Soa:
    timers = struct.pack(">IIIII", zone.index & 0xFFFFFFFF, *SOA_TIMERS, ttl)
    return _Soa((b"ns", *domain), (b"hostmaster", *domain), timers)


def _bare(ident: int, flags: int, rcode: int) -> Response:
    """Header only (no question): for requests we cannot or will not parse."""
    out_flags = 0x8000 | (flags & 0x7900) | rcode  # opcode and RD as asked
    return Response(_HEADER.pack(ident, out_flags, 0, 0, 0, 0), "NONE", RCODE_NAMES[rcode])


def _parse(data: bytes, qdcount: int) -> _Query:
    if qdcount != 1:
        raise _FormErr
    n, pos, labels, size = len(data), 12, [], 1
    while True:
        if pos >= n:
            raise _FormErr
        length = data[pos]
        if length == 0:
            pos += 1
            break
        size += length + 1
        if length > 63 or pos + 1 + length > n or size > 255:  # no pointers in a question
            raise _FormErr
        labels.append(data[pos + 1:pos + 1 + length].lower())
        pos += 1 + length
    if pos + 4 > n:
        raise _FormErr
    ident, flags, _, ancount, nscount, arcount = _HEADER.unpack_from(data)
    qtype, qclass = struct.unpack_from(">HH", data, pos)
    q = _Query(ident, flags, pos + 4, tuple(labels), qtype, qclass)
    pos = q.qend
    for i in range(ancount + nscount + arcount):
        opt = i >= ancount + nscount and pos < n and data[pos] == 0
        pos = _skip_name(data, pos)
        if pos + 10 > n:
            raise _FormErr
        rtype, rclass, rttl, rdlen = _RR.unpack_from(data, pos)
        pos += 10 + rdlen
        if pos > n:
            raise _FormErr
        if rtype == OPT:
            if not opt or q.edns is not None:  # not at the root, or a second one
                raise _FormErr
            q.edns, q.edns_version = rclass, (rttl >> 16) & 0xFF
    return q


def _skip_name(data: bytes, pos: int) -> int:
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
    raise _FormErr


class _Writer:
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

    def records(self, records: Sequence[_Record], ttl: int,
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

    def _record(self, owner: Labels | None, rtype: int, rdata: bytes | _Srv | _Soa,
                ttl: int) -> None:
        if owner is None:
            self.buf += b"\xc0\x0c"  # the question's name
        else:
            self.name(owner)
        self.buf += _RR.pack(rtype, CLASS_IN, ttl, 0)
        start = len(self.buf)
        if isinstance(rdata, _Srv):
            self.buf += struct.pack(">HHH", 1, rdata.weight, rdata.port)
            self.name(rdata.target, compress=False)  # RFC 2782: never compressed
        elif isinstance(rdata, _Soa):
            self.name(rdata.mname)
            self.name(rdata.rname)
            self.buf += rdata.timers
        else:
            self.buf += rdata
        struct.pack_into(">H", self.buf, start - 2, len(self.buf) - start)

    def finish(self, q: _Query, rcode: int, aa: bool, tc: int,
               counts: tuple[int, int, int] = (0, 0, 0)) -> bytes:
        an, ns, ar = counts
        if q.edns is not None:
            self.buf += b"\x00" + _RR.pack(OPT, UDP_MAX, (rcode >> 4) << 24, 0)
            ar += 1
        flags = 0x8000 | (0x0400 if aa else 0) | tc | (q.flags & 0x0110) | (rcode & 0xF)
        self.buf[:12] = _HEADER.pack(q.ident, flags, 1, an, ns, ar)
        return bytes(self.buf)
