"""The DNS zone: what the answers come from, built from the catalog, then changed by service.

A DNS server follows the whole catalog, so at 10,000 hosts of 10 instances each holds 100,000
and takes every change of the fleet. Building the zone afresh for each change cost 1 s there
(``bench/per_change.py``); :meth:`Zone.from_catalog` with the zone before instead takes again
only the services that changed since its index (:meth:`Catalog.changed_since`), and the
services with an instance on a node whose address moved: a change costs what its service
holds, not what the catalog holds. A zone is never changed once built (queries read it
while the next is built): the next copies the maps it changes, and each node's counts it
touches.

Every record is checked before it may reach an answer (``validate.dns_label`` of its service
and node, ``validate.address``), once while it is unchanged. A node's address
(``<node>.node``) is the one most of its own records carry (ids ``<node>:…``, as its agent
writes them; ties: the lowest), or, for a node with none (Nerve's ids need not name it), most
of the records naming it in their ``node`` field. A record that only claims a node (a
script's, a hand edit, another host's) never moves the answer of a node that has records of
its own; one that would have is named in a warning, once while it lasts.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from discovery.errors import ValidationError
from discovery.lookup.dns_packet import AAAA, ANY, SRV, A, Labels
from discovery.model import Instance, State, id_node
from discovery.model import validate as v
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

#: a zone keeps the address and member lists of the names asked (a big service's de-duplicated
#: addresses cost 1.4 ms at 5,000 instances): at most this many lists, of this many items in all
LIST_ENTRIES = 4096
LIST_ITEMS = 1 << 20
#: records outranked in a node's address named by one zone build (the others: counted); the
#: server keeps those still outranked across builds, so each is named once while it lasts
WARNED_MAX = 10

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Listed = tuple[Sequence[IP], Sequence["Member"]]  # a name's addresses, or its SRV members
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Member:
    """An instance as the DNS sees it: validated address and SRV target (relative labels)."""

    instance: Instance
    ip: IP
    target: Labels


class _Node:
    """What a zone's records say of one node: the addresses they carry (all of them, and
    those under ids that name another node, with those records' keys), and how many each
    service has on it."""

    __slots__ = ("claimed", "culprits", "foreign", "services")

    def __init__(self) -> None:
        self.claimed: dict[IP, int] = {}
        self.foreign: dict[IP, int] = {}
        self.culprits: dict[IP, set[Key]] = {}
        self.services: dict[str, int] = {}

    def __eq__(self, other: object) -> bool:  # (tests compare zones built two ways)
        return isinstance(other, _Node) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def count(self, inst: Instance, ip: IP, delta: int) -> None:
        _add(self.claimed, ip, delta)
        _add(self.services, inst.service, delta)
        if id_node(inst.id) != inst.node:
            _add(self.foreign, ip, delta)
            keys = self.culprits.setdefault(ip, set())
            (keys.add if delta > 0 else keys.discard)(inst.key)
            if not keys:
                del self.culprits[ip]

    def address(self, node: str, outranked: dict[tuple[str, ...], str]) -> IP:
        """The node's address; a claim it outranked goes into ``outranked``, with its warning."""
        ip = _most_common(self.claimed)
        own = {a: n - self.foreign.get(a, 0) for a, n in self.claimed.items()
               if n > self.foreign.get(a, 0)} if self.foreign else None
        if own:  # its own records decide
            ip, would = _most_common(own), ip
            if ip != would:
                culprit = min(self.culprits[would])
                outranked[(node, *culprit, str(would))] = (
                    f"dns: {node}.node answers {ip}, the address of its own records (ids "
                    f"{node}:…), not {would}, that of {culprit[0]}/{culprit[1]} and any other "
                    f"record naming node {node} under an id not its own")
        return ip


@dataclass
class _Records:
    """What a zone is built from, besides what answers read: each service's records that may
    be in an answer (any state), sorted by id, and the check of each (node, address) of its
    records (their addresses), kept while the service is unchanged; each node's counts; how
    many records carry each address; the SRV targets. Handed from a zone to the next it is
    built from (and changed there)."""

    valid: dict[str, list[Instance]] = field(default_factory=dict)
    checks: dict[str, dict[tuple[str, str], IP | None]] = field(default_factory=dict)
    nodes: dict[str, _Node] = field(default_factory=dict)
    addrs: dict[bytes, int] = field(default_factory=dict)
    #: each SRV target once, however many members have it (a node's and an address's)
    targets: dict[Labels, Labels] = field(default_factory=dict, compare=False)


class Zone:
    """Everything the answers come from, as of one catalog index. ``Zone(instances)`` builds it
    whole; :meth:`from_catalog` with the zone before takes again only what changed."""

    def __init__(self, instances: Iterable[Instance] = (), index: int = 0,
                 loaded: bool = True, warned: set[tuple[str, ...]] | None = None) -> None:
        #: the catalog has its first snapshot: until then every name in the domain is answered
        #: SERVFAIL (as HTTP answers 503), never NXDOMAIN, which resolvers cache as "no such
        #: name" (a watcher started while the registry is down)
        self.index, self.loaded = index, loaded
        #: the index of the zone this one was built from, and the services whose members it
        #: took again (their answers changed or may have; None: built whole, every one)
        self.before: int | None = None
        self.redone: frozenset[bytes] | None = None
        self.services: dict[bytes, list[Member]] = {}  # up instances only, sorted by id
        #: names of two labels with no records of their own but names below them (empty
        #: non-terminals: NOERROR, not NXDOMAIN, for resolvers that minimise query names),
        #: each with how many services have it
        self.parents: Counter[Labels] = Counter()
        self.nodes: dict[bytes, IP] = {}  # <node>.node: its own records' address
        self.addrs: dict[bytes, IP] = {}  # <hex address>.addr
        #: None once handed to the zone built from this one (or lost to a build that failed)
        self._records: _Records | None = _Records()
        self._lists: dict[tuple[Labels, int], Listed] = {}
        self._items = 0
        groups: dict[str, list[Instance]] = {}
        for inst in sorted(instances, key=lambda i: (i.service, i.id)):  # (catalog: as is)
            groups.setdefault(inst.service, []).append(inst)
        self._take(self._records, groups, warned, whole=True)

    @classmethod
    def from_catalog(cls, catalog: Catalog, warned: set[tuple[str, ...]] | None = None,
                     before: Zone | None = None) -> Zone:
        """The zone of ``catalog`` as it is now; with ``before`` (the last zone built of this
        catalog), from it and the services that changed since
        (:meth:`Catalog.changed_since`): ``before`` stays as it is, its records go to the new
        zone (a zone built from ``before`` again is built whole)."""
        records = before._records if before is not None else None
        if before is None or records is None:
            index, loaded = catalog.index, catalog.loaded  # read first: the data is this new
            return cls(catalog.instances(), index, loaded, warned)
        before._records = None
        index, loaded, changed = catalog.changed_since(before.index, records.valid)
        zone = cls.__new__(cls)
        zone.index, zone.loaded, zone._lists, zone._items = index, loaded, {}, 0
        zone.before = before.index
        zone.services, zone.parents = dict(before.services), Counter(before.parents)
        zone.nodes, zone.addrs = dict(before.nodes), dict(before.addrs)
        zone.redone = frozenset(s.encode() for s in zone._take(records, changed, warned,
                                                                whole=False))
        zone._records = records
        return zone

    def _take(self, records: _Records, changed: Mapping[str, list[Instance]],
              warned: set[tuple[str, ...]] | None, whole: bool) -> set[str]:
        """Take each service of ``changed`` as it is now (none: gone), then the addresses of
        the nodes it touched, then the members of the services it and those nodes touched
        (returned)."""
        touched: set[str] = set()
        for service, instances in changed.items():
            known, checks, valid = records.checks.pop(service, {}), {}, []
            for inst in records.valid.pop(service, ()):
                self._count(records, inst, _ip(known, inst), -1, touched)
            for inst in instances:
                where = (inst.node, inst.address)
                ip = checks[where] = known[where] if where in known else _checked(service, *where)
                if ip is not None:
                    valid.append(inst)
                    self._count(records, inst, ip, 1, touched)
            if instances:
                records.valid[service], records.checks[service] = valid, checks
        redo = set(changed)
        outranked: dict[tuple[str, ...], str] = {}
        for node in touched:
            name = node.encode()
            held = self.nodes.get(name)
            claims = records.nodes.get(node)
            if claims is None or not claims.claimed:
                records.nodes.pop(node, None)
                records.targets.pop((name, b"node"), None)
                self.nodes.pop(name, None)
                continue
            self.nodes[name] = ip = claims.address(node, outranked)
            if ip != held:
                redo.update(claims.services)
        if warned is not None:  # built whole: what is outranked now is all there is
            _name_new(outranked, warned, None if whole else touched)
        for service in redo:
            self._members(records, service)
        return redo

    def _count(self, records: _Records, inst: Instance, ip: IP, delta: int,
               touched: set[str]) -> None:
        """Count one record in (``delta`` 1) or out (-1) of its node and address."""
        touched.add(inst.node)
        claims = records.nodes.get(inst.node)
        if claims is None:
            claims = records.nodes[inst.node] = _Node()
        claims.count(inst, ip, delta)
        hexed = ip.packed.hex().encode()
        if _add(records.addrs, hexed, delta):
            self.addrs[hexed] = ip
        else:
            self.addrs.pop(hexed, None)
            records.targets.pop((hexed, b"addr"), None)

    def _members(self, records: _Records, service: str) -> None:
        """The members of ``service``: its records that are up, with their SRV targets (their
        node's name where that answers their address), and the names above them."""
        name = service.encode()
        for parent in _parents(self.services.pop(name, ())):
            _add(self.parents, parent, -1)
        members = []
        checks = records.checks.get(service, {})
        for inst in records.valid.get(service, ()):
            if inst.state is State.UP:
                ip = _ip(checks, inst)
                node = inst.node.encode()
                target = (node, b"node") if self.nodes.get(node) == ip else \
                    (ip.packed.hex().encode(), b"addr")
                members.append(Member(inst, ip, records.targets.setdefault(target, target)))
        if members:
            self.services[name] = members
            for parent in _parents(members):
                _add(self.parents, parent, 1)

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
            (pick(dict.fromkeys(m.ip for m in found), qtype), ())
        if len(self._lists) >= LIST_ENTRIES or self._items + len(found) > LIST_ITEMS:
            self._lists.clear()  # (under several threads the count is roughly right)
            self._items = 0
        self._lists[key] = hit
        self._items += len(found)
        return hit

    def _found(self, rel: Labels) -> list[Member]:
        """The members a name of the forms ``*.service`` and ``*.zone`` stands for."""
        named = service_of(rel)
        if named is None:
            return []
        service, tag = named
        if rel[-1] == b"zone":  # <service>.<zone>.zone: one availability zone's
            where = rel[1].decode("ascii", "replace")
            return [m for m in self.members(service, None) if m.instance.zone == where]
        return self.members(service, tag)


def service_of(rel: Labels) -> tuple[bytes, bytes | None] | None:
    """The service (and tag) a name relative to the domain stands for: ``<service>.service``,
    ``<tag>.<service>.service``, ``_<service>._tcp|_<tag>.service``, ``<service>.<zone>.zone``;
    None for any other name."""
    n = len(rel)
    if n < 2:
        return None
    kind = rel[-1]
    if kind == b"service" and n == 2:
        return rel[0], None
    if kind == b"service" and n == 3 and rel[0][:1] == b"_" and rel[1][:1] == b"_":
        return rel[0][1:], None if rel[1] == b"_tcp" else rel[1][1:]
    if kind == b"service" and n == 3:
        return rel[1], rel[0]
    if kind == b"zone" and n == 3:
        return rel[0], None
    return None


def _ip(checks: Mapping[tuple[str, str], IP | None], inst: Instance) -> IP:
    """The checked address of a record that may be in an answer."""
    ip = checks[inst.node, inst.address]
    assert ip is not None  # (only those are kept)
    return ip


def _parents(members: Iterable[Member]) -> set[Labels]:
    """The empty non-terminals a service's members stand under."""
    out: set[Labels] = set()
    for m in members:
        inst = m.instance
        out.update([(b"_tcp", b"service"), *((b"_" + t.encode(), b"service") for t in inst.tags),
                    *([(inst.zone.encode(), b"zone")] if inst.zone else [])])
    return out


def _add(counts: dict[Any, int], key: object, delta: int) -> int:
    """Add ``delta`` to ``counts[key]``, dropping it at 0; what is left."""
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]
    return left


def _checked(service: str, node: str, address: str) -> IP | None:
    """The address, if service, node and address may be written into an answer."""
    try:
        v.dns_label("service", service)
        v.dns_label("node", node)
        return ipaddress.ip_address(v.address("address", address))
    except (ValidationError, ValueError) as exc:
        log.debug("dns: %s/%s/%s left out: %s", service[:64], node[:64], address[:64], exc)
        return None


def _name_new(outranked: dict[tuple[str, ...], str], warned: set[tuple[str, ...]],
              nodes: set[str] | None) -> None:
    """Warn of the records ``outranked`` (on ``nodes``, those this build looked at; None:
    all) that ``warned`` (the server's, from the zones before) does not hold, at most
    :data:`WARNED_MAX` by name and the rest counted, then keep in ``warned`` those outranked
    now: bounded by the catalog, and one outranked again later is named again."""
    new = [text for key, text in outranked.items() if key not in warned]
    for text in new[:WARNED_MAX]:
        log.warning("%s", text)
    if len(new) > WARNED_MAX:
        log.warning("dns: %d more records naming a node under an id not their own were "
                    "outranked by the node's own records", len(new) - WARNED_MAX)
    warned.difference_update([key for key in warned if nodes is None or key[0] in nodes])
    warned.update(outranked)


def _most_common(counts: dict[IP, int]) -> IP:
    if len(counts) == 1:  # (most nodes)
        return next(iter(counts))
    top = max(counts.values())
    return min((ip for ip, c in counts.items() if c == top), key=lambda ip: (ip.version, ip))


def pick(ips: Iterable[IP], qtype: int) -> list[IP]:
    """Of ``ips``, those a query of ``qtype`` asks for (A: IPv4, AAAA: IPv6, ANY: both)."""
    want = {A: (4,), AAAA: (6,), ANY: (4, 6)}.get(qtype, ())
    return [ip for ip in ips if ip.version in want]
