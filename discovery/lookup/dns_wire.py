"""DNS answers from the catalog, in wire format: parsing and encoding only, no sockets.

Names (case-insensitive) under the domain: ``[<tag>.]<service>.service``,
``<service>.<zone>.zone`` (the instances of one zone) and ``_<service>._tcp|_<tag>.service``
(A/AAAA of the instances that are up, SRV with the targets' addresses as additional records),
``<node>.node`` (its own records' address), ``<hex address>.addr`` (SRV targets off their
node's address), and the apex (SOA). Unknown names: NXDOMAIN, no record of that type: NOERROR;
both with the SOA as authority. Outside the domain: REFUSED. UDP answers carry at most
``udp_answer_limit`` answer records (3, as Consul; a window that moves round every record, no TC)
and fit 512 bytes or the client's EDNS size (at most 4096): answer records that do not fit set
TC, additional ones are just left out (RFC 2181 §9), as are (with a limit) those that would take
the response past 10x the size of the request without padding. TCP answers carry every record
that fits 64 KiB (``TCP_MAX``: 4,093 A records, about 1,500 SRV), then set TC. See
docs/dns.md. The byte-level parser and writer are :mod:`discovery.lookup.dns_packet`.

Every label in an answer is built from values validated again as the zone is built
(:mod:`discovery.lookup.dns_zone`: ``validate.dns_label``, ``validate.address``); nothing from
the registry reaches the wire unchecked."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from discovery.errors import ConfigError, ValidationError
from discovery.lookup.dns_packet import (
    AAAA,
    ANY,
    AXFR,
    CLASS_IN,
    HEADER,
    IXFR,
    NS,
    SOA,
    SRV,
    TCP_MAX,
    UDP_MAX,
    UDP_MIN,
    A,
    FormErr,
    Labels,
    Record,
    Soa,
    Srv,
    Writer,
    parse,
)
from discovery.lookup.dns_zone import IP, Member, Zone, pick, service_of
from discovery.model import validate as v
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
MAX_ROTATIONS = 8
MAX_WINDOWS = 1024  # capped UDP answers: at most this many windows (x the limit: all served)
UDP_ANSWER_LIMIT = 3  # answer records in a UDP response, by default (Consul's udp_answer_limit)
MAX_AMPLIFICATION = 10  # UDP: additional records only while response <= 10 x bare request
SOA_TIMERS = (3600, 600, 86400)  # refresh, retry, expire
MAX_DOMAIN = 180  # so that <63-char node>.node.<domain> stays under 255 bytes

#: Labels for metrics (bounded sets): other query types are "OTHER"; "NONE" = no question.
QTYPE_NAMES = {A: "A", NS: "NS", 5: "CNAME", SOA: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
               AAAA: "AAAA", SRV: "SRV", 65: "HTTPS", IXFR: "IXFR", AXFR: "AXFR", ANY: "ANY"}
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
               NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}



@dataclass(frozen=True)
class DnsConfig:
    """The zone's domain (normalised: lowercase, trailing dot), the TTL of every record, and how
    many answer records a UDP response carries at most (0: as many as fit)."""

    domain: str = "discovery."
    ttl: int = 0
    udp_answer_limit: int = UDP_ANSWER_LIMIT

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
        limit = self.udp_answer_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 65535:
            raise ConfigError(f"dns udp answer limit {limit!r}: must be an integer in 0..65535")
        object.__setattr__(self, "domain", domain + ".")

    @property
    def labels(self) -> Labels:
        return tuple(label.encode() for label in self.domain.rstrip(".").split("."))


@dataclass(frozen=True)
class Response:
    wire: bytes
    qtype: str
    rcode: str
    rotations: int = 1  # how many distinct answer orders or windows (``rotate``) to cache
    #: the service whose records answer it, all of them (none else: the SOA of an answer
    #: without records carries the zone's index): cached while the zone keeps its members
    service: bytes | None = None


def answer(request: bytes, catalog: Catalog, config: DnsConfig | None = None, *,
           tcp: bool = False) -> bytes | None:
    """The wire-format response to one request; ``None`` means: drop it, send nothing."""
    resp = respond(request, Zone.from_catalog(catalog), config or DnsConfig(), tcp=tcp)
    return None if resp is None else resp.wire


def respond(data: bytes, zone: Zone, config: DnsConfig, *, tcp: bool = False,
            rotate: int = 0) -> Response | None:
    """Answer ``data`` from ``zone``. ``rotate`` turns the answer records round by that many
    (or, when the UDP answer limit cuts them, picks that window of them)."""
    data = bytes(data)
    if len(data) < 12 or data[2] & 0x80:  # no header, or a response: never answer those
        return None
    ident, flags, qdcount = struct.unpack_from(">HHH", data)
    if (flags >> 11) & 0xF:
        return _bare(ident, flags, NOTIMP)
    try:
        q = parse(data, qdcount)
    except FormErr:
        return _bare(ident, flags, FORMERR)
    qtype = QTYPE_NAMES.get(q.qtype, "OTHER")
    out = Writer(data[:q.qend], q.labels)
    if q.edns is not None and q.edns_version > 0:
        return Response(out.finish(q, BADVERS, False, 0), qtype, "BADVERS")
    limit = TCP_MAX if tcp else max(UDP_MIN, min(q.edns or 0, UDP_MAX))
    domain = config.labels
    if q.qclass not in (CLASS_IN, ANY) or q.labels[-len(domain):] != domain \
            or q.qtype in (AXFR, IXFR):
        return Response(out.finish(q, REFUSED, False, 0), qtype, "REFUSED")
    if not zone.loaded:
        return Response(out.finish(q, SERVFAIL, False, 0), qtype, "SERVFAIL")
    rel = q.labels[:-len(domain)]
    cap = 0 if tcp else config.udp_answer_limit
    rcode, records, extra, rotations = _answers(zone, rel, q.qtype, config, cap, rotate)
    ttl = config.ttl
    auth: list[Record] = [] if records else [(domain, SOA, _soa(zone, domain, ttl))]
    edns = q.edns is not None
    an, tc = out.records(records, ttl, limit, edns, required=True)
    ns, tc = (0, tc) if tc else out.records(auth, ttl, limit, edns, required=True)
    if not tcp and config.udp_answer_limit:  # optional records: not past 10x a bare request
        limit = min(limit, MAX_AMPLIFICATION * (q.qend + (11 if edns else 0)))
    ar = 0 if tc else out.records(extra, ttl, limit, edns, required=False)[0]
    wire = out.finish(q, rcode, True, 0x0200 if tc else 0, (an, ns, ar))
    named = service_of(rel) if records else None
    return Response(wire, qtype, RCODE_NAMES[rcode], rotations,
                    None if named is None else named[0])


def _answers(zone: Zone, rel: Labels, qtype: int, config: DnsConfig, cap: int,
             rotate: int) -> tuple[int, list[Record], list[Record], int]:
    """(rcode, answer records, additional records, turns) for a name relative to the domain,
    in turn ``rotate``; ``cap``: the UDP answer limit (0: none). Only the records of the turn's
    window are built: once the zone has listed the name, a UDP answer costs the same for 5
    instances as for 5,000 (building all and cutting them: 2.5 ms at 5,000)."""
    rcode, ips, members, soa = _resolve(zone, rel, qtype)
    picked, rotations = _turn(soa + len(ips) + len(members), rotate, cap)
    domain, ttl = config.labels, config.ttl
    records: list[Record] = []
    targets: dict[Labels, IP] = {}
    for i in picked:
        if i < soa:
            records.append((None, SOA, _soa(zone, domain, ttl)))
        elif i < soa + len(ips):
            ip = ips[i - soa]
            records.append((None, A if ip.version == 4 else AAAA, ip.packed))
        else:
            m = members[i - soa - len(ips)]
            target = m.target + domain
            targets.setdefault(target, m.ip)
            records.append((None, SRV, Srv(m.instance.weight, m.instance.port, target)))
    glue = dict.fromkeys(r[2].target for r in records if isinstance(r[2], Srv))
    extra: list[Record] = [(t, A if targets[t].version == 4 else AAAA, targets[t].packed)
                           for t in glue]
    return rcode, records, extra, rotations


def _turn(n: int, rotate: int, cap: int) -> tuple[list[int], int]:
    """The indices of ``n`` records in turn ``rotate``, and how many turns there are. Within
    ``cap`` (0: none) all of them, turned round; beyond it a window of ``cap``, the windows
    spread evenly."""
    if cap and n > cap:
        rotations = min(-(-n // cap), MAX_WINDOWS)
        start = (rotate % rotations) * n // rotations
        return [(start + i) % n for i in range(cap)], rotations
    rotations = min(n, MAX_ROTATIONS) if n > 1 else 1
    k = rotate % rotations
    return [*range(k, n), *range(k)], rotations


def _resolve(zone: Zone, rel: Labels,
             qtype: int) -> tuple[int, Sequence[IP], Sequence[Member], bool]:
    """(rcode, addresses, SRV members, SOA?) for a name relative to the domain."""
    if not rel:
        return NOERROR, (), (), qtype in (SOA, ANY)
    kind, n = rel[-1], len(rel)
    if (n == 1 and kind in (b"service", b"node", b"addr", b"zone")) or rel in zone.parents:
        return NOERROR, (), (), False  # empty non-terminals
    if kind in (b"node", b"addr") and n == 2:
        ip = (zone.nodes if kind == b"node" else zone.addrs).get(rel[0])
        return (NXDOMAIN, (), (), False) if ip is None else \
            (NOERROR, pick([ip], qtype), (), False)
    listed = zone.listed(rel, qtype)
    if listed is None:
        return NXDOMAIN, (), (), False
    return NOERROR, *listed, False


def _soa(zone: Zone, domain: Labels, ttl: int) -> Soa:
    timers = struct.pack(">IIIII", zone.index & 0xFFFFFFFF, *SOA_TIMERS, ttl)
    return Soa((b"ns", *domain), (b"hostmaster", *domain), timers)


def _bare(ident: int, flags: int, rcode: int) -> Response:
    """Header only (no question): for requests we cannot or will not parse."""
    out_flags = 0x8000 | (flags & 0x7900) | rcode  # opcode and RD as asked
    return Response(HEADER.pack(ident, out_flags, 0, 0, 0, 0), "NONE", RCODE_NAMES[rcode])
