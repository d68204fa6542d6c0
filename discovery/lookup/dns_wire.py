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

Every label in an answer is built from values validated here again (``validate.dns_label``,
``validate.address``); nothing from the registry reaches the wire unchecked."""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
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
from discovery.model import Instance, State, id_node
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
#: a zone keeps the address and member lists of the names asked (a big service's de-duplicated
#: addresses cost 1.4 ms at 5,000 instances): at most this many lists, of this many items in all
LIST_ENTRIES = 4096
LIST_ITEMS = 1 << 20
#: records outranked in a node's address named by one zone build (the others: counted); the
#: server keeps those still outranked across builds, so each is named once while it lasts
WARNED_MAX = 10

#: Labels for metrics (bounded sets): other query types are "OTHER"; "NONE" = no question.
QTYPE_NAMES = {A: "A", NS: "NS", 5: "CNAME", SOA: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
               AAAA: "AAAA", SRV: "SRV", 65: "HTTPS", IXFR: "IXFR", AXFR: "AXFR", ANY: "ANY"}
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
               NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Listed = tuple[Sequence[IP], Sequence["Member"]]  # a name's addresses, or its SRV members


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
class Member:
    """An instance as the DNS sees it: validated address and SRV target (relative labels)."""

    instance: Instance
    ip: IP
    target: Labels


class Zone:
    """Everything the answers come from, built once per catalog index."""

    def __init__(self, instances: Iterable[Instance], index: int = 0,
                 loaded: bool = True, warned: set[tuple[str, ...]] | None = None,
                 before: Zone | None = None) -> None:
        #: the catalog has its first snapshot: until then every name in the domain is answered
        #: SERVFAIL (as HTTP answers 503), never NXDOMAIN, which resolvers cache as "no such
        #: name" (a watcher started while the registry is down)
        self.index, self.loaded = index, loaded
        self.services: dict[bytes, list[Member]] = {}  # up instances only, sorted by id
        #: names of two labels with no records of their own but names below them (empty
        #: non-terminals: NOERROR, not NXDOMAIN, for resolvers that minimise query names)
        self.parents: set[Labels] = set()
        #: each record's address if it may be in an answer; ``before``'s not checked again
        self.checked: dict[tuple[str, str, str], IP | None] = {}
        known, valid = before.checked if before is not None else {}, []
        for inst in instances:
            key = (inst.service, inst.node, inst.address)
            ip = self.checked[key] = known[key] if key in known else _checked(*key)
            if ip is not None:
                valid.append((inst, ip))
        self.addrs = {ip.packed.hex().encode(): ip for _, ip in valid}
        # <node>.node: its own address; ``warned``: the culprits named before (the server's)
        self.nodes = _node_addresses(valid, set() if warned is None else warned)
        for inst, ip in valid:
            if inst.state is not State.UP:
                continue
            node = inst.node.encode()
            target = (node, b"node") if self.nodes[node] == ip else \
                (ip.packed.hex().encode(), b"addr")
            self.services.setdefault(inst.service.encode(), []).append(Member(inst, ip, target))
            self.parents.update([(b"_tcp", b"service"),
                                 *((b"_" + t.encode(), b"service") for t in inst.tags),
                                 *([(inst.zone.encode(), b"zone")] if inst.zone else [])])
        for members in self.services.values():
            members.sort(key=lambda m: m.instance.id)
        self._lists: dict[tuple[Labels, int], Listed] = {}
        self._items = 0

    @classmethod
    def from_catalog(cls, catalog: Catalog, warned: set[tuple[str, ...]] | None = None,
                     before: Zone | None = None) -> Zone:
        index, loaded = catalog.index, catalog.loaded  # read first: the data is this new
        return cls(catalog.instances(), index, loaded, warned, before)

    def members(self, service: bytes, tag: bytes | None) -> list[Member]:
        found = self.services.get(service, [])
        if tag is None:
            return found
        return [m for m in found if tag.decode("ascii", "replace") in m.instance.tags]

    def listed(self, rel: Labels, qtype: int) -> Listed | None:
        """The addresses (A, AAAA, ANY: de-duplicated, in the members' order) or the members
        (SRV) of a service name relative to the domain; ``None``: no such name. Kept for the
        next query (bounded: :data:`LIST_ENTRIES`, :data:`LIST_ITEMS`)."""
        key = (rel, qtype if qtype in (A, AAAA, ANY, SRV) else 0)
        hit = self._lists.get(key)
        if hit is not None:
            return hit
        found = self._found(rel)
        if not found:
            return None
        hit = ((), found) if qtype == SRV else \
            (_pick(dict.fromkeys(m.ip for m in found), qtype), ())
        if len(self._lists) >= LIST_ENTRIES or self._items + len(found) > LIST_ITEMS:
            self._lists.clear()  # (under several threads the count is roughly right)
            self._items = 0
        self._lists[key] = hit
        self._items += len(found)
        return hit

    def _found(self, rel: Labels) -> list[Member]:
        """The members a name of the forms ``*.service`` and ``*.zone`` stands for."""
        kind, n = rel[-1], len(rel)
        if kind == b"service" and n == 2:
            return self.members(rel[0], None)
        if kind == b"service" and n == 3 and rel[0][:1] == b"_" and rel[1][:1] == b"_":
            return self.members(rel[0][1:], None if rel[1] == b"_tcp" else rel[1][1:])
        if kind == b"service" and n == 3:
            return self.members(rel[1], rel[0])
        if kind == b"zone" and n == 3:  # <service>.<zone>.zone: one availability zone's
            where = rel[1].decode("ascii", "replace")
            return [m for m in self.members(rel[0], None) if m.instance.zone == where]
        return []


@dataclass(frozen=True)
class Response:
    wire: bytes
    qtype: str
    rcode: str
    rotations: int = 1  # how many distinct answer orders or windows (``rotate``) to cache


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
    return Response(wire, qtype, RCODE_NAMES[rcode], rotations)


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
            (NOERROR, _pick([ip], qtype), (), False)
    listed = zone.listed(rel, qtype)
    if listed is None:
        return NXDOMAIN, (), (), False
    return NOERROR, *listed, False


def _checked(service: str, node: str, address: str) -> IP | None:
    """The address, if service, node and address may be written into an answer."""
    try:
        v.dns_label("service", service)
        v.dns_label("node", node)
        return ipaddress.ip_address(v.address("address", address))
    except (ValidationError, ValueError) as exc:
        log.debug("dns: %s/%s/%s left out: %s", service[:64], node[:64], address[:64], exc)
        return None


def _node_addresses(valid: Sequence[tuple[Instance, IP]], warned: set[tuple[str, ...]]
                    ) -> dict[bytes, IP]:
    """Each node's address: the one most of its own records carry (ids ``<node>:…``, as its
    agent writes them; ties: the lowest), or, for a node with none (Nerve's ids need not name
    it), most of the records naming it in their ``node`` field. A record that only claims a
    node (a script's, a hand edit, another host's) never moves the answer of a node that has
    records of its own; one that would have is named in a warning (once: ``warned``)."""
    claimed: dict[str, Counter[IP]] = {}
    foreign: dict[str, Counter[IP]] = {}  # claims under ids that name another node: rare
    culprits: dict[tuple[str, IP], tuple[str, str]] = {}  # the lowest (service, id) of those
    for inst, ip in valid:
        claimed.setdefault(inst.node, Counter())[ip] += 1
        if id_node(inst.id) != inst.node:
            foreign.setdefault(inst.node, Counter())[ip] += 1
            culprits[inst.node, ip] = min(culprits.get((inst.node, ip), inst.key), inst.key)
    nodes: dict[bytes, IP] = {}
    outranked: dict[tuple[str, ...], str] = {}  # (node, service, id, address) -> its warning
    for node, counts in claimed.items():
        ip = _most_common(counts)
        if node in foreign and (own := counts - foreign[node]):  # its own records decide
            ip, would = _most_common(own), ip
            if ip != would:
                culprit = culprits[node, would]
                outranked[(node, *culprit, str(would))] = (
                    f"dns: {node}.node answers {ip}, the address of its own records (ids "
                    f"{node}:…), not {would}, that of {culprit[0]}/{culprit[1]} and any other "
                    f"record naming node {node} under an id not its own")
        nodes[node.encode()] = ip
    _name_new(outranked, warned)
    return nodes


def _name_new(outranked: dict[tuple[str, ...], str], warned: set[tuple[str, ...]]) -> None:
    """Warn of the records ``outranked`` that ``warned`` (the server's, from the zone before)
    does not hold, at most :data:`WARNED_MAX` by name and the rest counted, then keep in
    ``warned`` those outranked now: bounded by the catalog, and one outranked again later is
    named again."""
    new = [text for key, text in outranked.items() if key not in warned]
    for text in new[:WARNED_MAX]:
        log.warning("%s", text)
    if len(new) > WARNED_MAX:
        log.warning("dns: %d more records naming a node under an id not their own were "
                    "outranked by the node's own records", len(new) - WARNED_MAX)
    warned.clear()
    warned.update(outranked)


def _most_common(counts: Counter[IP]) -> IP:
    top = max(counts.values())
    return min((ip for ip, c in counts.items() if c == top), key=lambda ip: (ip.version, ip))


def _pick(ips: Iterable[IP], qtype: int) -> list[IP]:
    want = {A: (4,), AAAA: (6,), ANY: (4, 6)}.get(qtype, ())
    return [ip for ip in ips if ip.version in want]


def _soa(zone: Zone, domain: Labels, ttl: int) -> Soa:
    timers = struct.pack(">IIIII", zone.index & 0xFFFFFFFF, *SOA_TIMERS, ttl)
    return Soa((b"ns", *domain), (b"hostmaster", *domain), timers)


def _bare(ident: int, flags: int, rcode: int) -> Response:
    """Header only (no question): for requests we cannot or will not parse."""
    out_flags = 0x8000 | (flags & 0x7900) | rcode  # opcode and RD as asked
    return Response(HEADER.pack(ident, out_flags, 0, 0, 0, 0), "NONE", RCODE_NAMES[rcode])
