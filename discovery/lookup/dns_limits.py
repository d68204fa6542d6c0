"""The bounds the DNS endpoint keeps under abuse: its UDP answer cache and its TCP limits.

The cache holds encoded responses by question (:func:`~discovery.lookup.dns_packet.cache_key`),
never by raw datagram, within ``CACHE_ENTRIES`` entries and ``CACHE_BYTES`` bytes. TCP: a whole
message within ``TCP_TIMEOUT`` seconds, ``MAX_TCP_CONNECTIONS`` at once, ``MAX_TCP_PER_CLIENT``
of them per client (an IPv4 address, an IPv6 /64). See docs/dns.md, "Limits".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from discovery.errors import ConfigError
from discovery.lookup.dns_wire import Response
from discovery.lookup.dns_zone import Zone

CACHE_ENTRIES = 4096  # distinct questions cached per catalog index; cleared when full
CACHE_BYTES = 8 << 20  # and at most this many bytes of keys, responses and overhead
ENTRY_OVERHEAD = 256  # bytes counted per entry for the dict slot, tuple and list around it
MAX_TCP_CONNECTIONS = 64
MAX_TCP_PER_CLIENT = 8  # per IPv4 address, per IPv6 /64
TCP_TIMEOUT = 5.0  # seconds for a whole message, from accept or the previous answer

_Entry = tuple[list["bytes | None"], str, str]  # a response's tails (per turn), qtype, rcode


@dataclass(frozen=True)
class TcpLimits:
    """How long a TCP message may take to arrive, whole (``timeout`` seconds, counted from the
    accept or the previous answer: a client dripping bytes is cut there, not ``timeout`` after
    its last byte), and how many connections are served at once, in all and per client."""

    timeout: float = TCP_TIMEOUT
    connections: int = MAX_TCP_CONNECTIONS
    per_client: int = MAX_TCP_PER_CLIENT

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 300:
            raise ConfigError(f"dns tcp timeout {self.timeout!r} is not in (0, 300] seconds")
        if not 1 <= self.per_client <= self.connections <= 4096:
            raise ConfigError(f"dns tcp limits: need 1 <= per client ({self.per_client}) <= "
                              f"connections ({self.connections}) <= 4096")


class AnswerCache:
    """Encoded UDP responses for one zone, by cache key; cleared when one more entry would pass
    ``max_entries`` or ``max_bytes``. When the zone moves on (:meth:`moved`), the answers of a
    service the zone took again go, and every answer that is not a service's records (a node,
    an address, a name with none: their SOA carries the zone's index); the others stay (before,
    every change anywhere cleared it all: a DNS server of a catalog changing 100 times a second
    answered every name anew each time)."""

    def __init__(self, max_entries: int = CACHE_ENTRIES, max_bytes: int = CACHE_BYTES) -> None:
        self.entries: dict[bytes, _Entry] = {}
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.index = -1
        self._keys: dict[bytes | None, list[bytes]] = {}  # service (None: other) -> its keys

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self, index: int | None = None) -> None:
        self.entries.clear()  # the same dict: the UDP loop holds its .get
        self._keys.clear()
        self.nbytes = 0
        if index is not None:
            self.index = index

    def moved(self, zone: Zone) -> None:
        """Keep what ``zone`` still answers the same (class docstring); all goes unless the
        cache is of the zone it was built from."""
        if zone.redone is None or zone.before != self.index:
            self.clear(zone.index)
            return
        redone = zone.redone  # (a reset's: every service; the cache may hold a few)
        held = redone if len(redone) <= len(self._keys) else \
            [s for s in self._keys if s in redone]
        for service in (None, *held):
            for key in self._keys.pop(service, ()):
                entry = self.entries.pop(key, None)
                if entry is not None:
                    self.nbytes -= _size(key, entry[0])
        self.index = zone.index

    def put(self, key: bytes, resp: Response) -> list[bytes | None]:
        """Cache ``resp`` as turn 0 of ``key``; returns its tails (see :meth:`fill`)."""
        size = ENTRY_OVERHEAD + len(key) + len(resp.wire) + 8 * resp.rotations
        if len(self.entries) >= self.max_entries or self.nbytes + size > self.max_bytes:
            self.clear()
        tails: list[bytes | None] = [None] * resp.rotations
        tails[0] = resp.wire[2:]
        self.entries[key] = (tails, resp.qtype, resp.rcode)
        self._keys.setdefault(resp.service, []).append(key)
        self.nbytes += size
        return tails

    def fill(self, tails: list[bytes | None], turn: int, tail: bytes) -> None:
        """Keep the response of another turn, encoded the first time it was served."""
        if self.nbytes + len(tail) <= self.max_bytes:
            tails[turn] = tail
            self.nbytes += len(tail)


def _size(key: bytes, tails: list[bytes | None]) -> int:
    """What :meth:`AnswerCache.put` and :meth:`AnswerCache.fill` counted for an entry."""
    return ENTRY_OVERHEAD + len(key) + 2 + sum(len(t) for t in tails if t) + 8 * len(tails)


def beyond_loopback(bind: str) -> bool:
    """True when ``bind`` (an IP address) can be reached from other hosts."""
    return not ipaddress.ip_address(bind).is_loopback

