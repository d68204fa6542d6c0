"""The DNS endpoint: UDP and TCP listeners answering from the watcher's catalog.

``DnsServer(catalog, bind, port, domain, ttl, on_query).start()`` runs one UDP thread and one
TCP accept thread (plus one thread per open TCP connection, within :class:`TcpLimits`: 64 in
all, 8 per client address, each message whole within 5 s: :mod:`~discovery.lookup.dns_tcp`).
What is answered and how is :mod:`discovery.lookup.dns_wire`; this module moves bytes.

Hot path (UDP): a response depends only on the question (name in any case, type, class), the
flags echoed, the client's EDNS size and the catalog index, so encoded responses are cached by
:func:`~discovery.lookup.dns_packet.cache_key` (never the raw datagram: padding cannot multiply
entries; nor can a name's case, which resolvers randomise, DNS 0x20) in an :class:`AnswerCache`
bounded in entries and bytes, and a hit is the cached response with the request's ID and
question name (:func:`~discovery.lookup.dns_packet.echo`), with no parsing. Responses with
several records come in several orders (or windows, when the UDP answer limit cuts them),
served in turn and each encoded the first time it is served. Anything malformed is answered
(FORMERR, NOTIMP) or dropped and never stops the loop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from discovery.errors import ConfigError, DiscoveryError, ValidationError
from discovery.lookup.dns_limits import CACHE_ENTRIES, AnswerCache, TcpLimits, beyond_loopback
from discovery.lookup.dns_packet import cache_key, echo
from discovery.lookup.dns_tcp import POLL, TcpConnections
from discovery.lookup.dns_wire import UDP_ANSWER_LIMIT, DnsConfig, Response, Zone, respond
from discovery.lookup.peers import Hushed
from discovery.model import validate as v
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_PORT = 8600
UDP_RCVBUF = 4 << 20
CACHEABLE = frozenset({"NOERROR", "NXDOMAIN"})  # not errors: anyone can send those
#: after a zone rebuild of d seconds the next waits this many times d: under a storm of
#: changes rebuilding takes at most a fifth of the time and the zone of a moment before
#: answers meanwhile. A rebuild takes again only the services changed since the last
#: (:mod:`~discovery.lookup.dns_zone`): 0.1 ms after one change at 1,000 instances, 11 ms at
#: 100,000 (bench/per_change.py); the first build, every record: 2.7 s at 100,000
REBUILD_WAIT = 4.0
#: but never longer than this (one slow rebuild, the watcher applying a big reset meanwhile)
REBUILD_WAIT_MAX = 2.0

QueryHook = Callable[[str, str], None]


def parse_listen(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``127.0.0.1:8600``, ``[::1]:8600``, ``127.0.0.1`` or ``:8600`` → (address, port)."""
    return v.listen("dns listen address", value, default_port, port_zero=True)


class DnsServer:
    """Answers DNS queries from ``catalog`` on ``bind``:``port`` (UDP and TCP)."""

    def __init__(self, catalog: Catalog, bind: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 domain: str = "discovery.", ttl: int = 0,
                 on_query: QueryHook | None = None, *, udp_threads: int = 1,
                 udp_answer_limit: int = UDP_ANSWER_LIMIT,
                 tcp_limits: TcpLimits | None = None) -> None:
        self.catalog = catalog
        self.config = DnsConfig(domain, ttl, udp_answer_limit)
        self.tcp_limits = tcp_limits or TcpLimits()
        try:
            self.bind = v.bind_address("dns bind address", bind)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"dns port {port!r} is not in 0..65535")
        if not 1 <= udp_threads <= 16:
            raise ConfigError(f"dns udp_threads {udp_threads!r} is not in 1..16")
        self.on_query = on_query
        self._requested_port = port
        self._udp_threads = udp_threads
        self._family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._tcp_conns = TcpConnections(self.tcp_limits, lambda data: self._answer(data, True),
                                         self._told, self._error)
        self._caches: list[AnswerCache] = []  # one per UDP thread
        self._lock = threading.Lock()
        self._warned: set[tuple[str, ...]] = set()  # records named by a zone build: once
        self._zone, self._next_build = Zone((), -1, loaded=False), 0.0  # next: a rebuild from
        self._building = threading.Lock()  # one rebuild at a time, never under self._lock
        self._stopping = threading.Event()
        self._errors = Hushed(log)  # a bug's traceback, once a minute

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0); the requested one before start()."""
        if self._udp is None:
            return self._requested_port
        port: int = self._udp.getsockname()[1]
        return port

    def start(self, inherited: tuple[socket.socket, socket.socket] | None = None) -> DnsServer:
        """Bind and answer; ``inherited``: the (UDP, TCP) listeners of a previous process
        (:mod:`discovery.lookup.handover`), answered on as they are."""
        if self._udp is not None:
            raise DiscoveryError("DnsServer already started")
        self._stopping.clear()
        self._caches = []  # (a restart's UDP threads make their own)
        self._udp, self._tcp = inherited or self._bind()
        tcp = self._tcp
        self._udp.setblocking(True)
        # a read waits POLL s at most, so a process handing over stops reading (and answers
        # what it read first) without anything done to the socket the next one reads
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", 0, int(POLL * 1_000_000)))
        self._tcp.setblocking(False)  # two processes may accept: never wait in accept()
        names = [f"dns-udp-{i}" for i in range(self._udp_threads)]
        targets: list[tuple[str, Callable[[], None]]] = [(n, self._serve_udp) for n in names]
        targets.append(("dns-tcp", lambda: self._tcp_conns.serve(tcp, self._stopping)))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("dns: answering for %s on %s port %d (udp, tcp), ttl %d, udp answer limit %d",
                 self.config.domain, self.bind, self.port, self.config.ttl,
                 self.config.udp_answer_limit)
        if beyond_loopback(self.bind):
            log.warning("dns: listening on %s, beyond loopback: anyone who reaches port %d can "
                        "read every service's addresses and use it against others (UDP answers "
                        "capped at %s records); firewall it to the hosts that need it",
                        self.bind, self.port, self.config.udp_answer_limit or "no")
        return self

    def listeners(self) -> list[tuple[str, socket.socket]]:
        """The listening sockets, to hand over to the next process."""
        if self._udp is None or self._tcp is None:
            return []
        return [("dns-udp", self._udp), ("dns-tcp", self._tcp)]

    def stop(self, timeout: float = 5.0, handoff: bool = False) -> None:
        """Stop answering; returns once every listener thread has ended (or ``timeout``).
        ``handoff``: the next process answers on the same sockets, so nothing is done to
        them (no wake-up datagram, no shutdown): the loops end on their next poll, a query
        read is answered first, and open TCP connections are served until their client
        closes them or leaves them idle (:class:`TcpLimits` ``timeout``)."""
        udp, tcp = self._udp, self._tcp
        if udp is None or tcp is None:
            return
        self._stopping.set()
        wake = ("127.0.0.1" if self._family == socket.AF_INET else "::1") \
            if self.bind in ("0.0.0.0", "::") else self.bind
        for _ in [] if handoff else self._threads:  # an empty datagram wakes a UDP thread
            with contextlib.suppress(OSError):
                udp.sendto(b"", (wake, self.port))
        if not handoff:
            self._tcp_conns.shut_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if handoff:  # open connections are served to their end (bounded by the idle timeout)
            self._tcp_conns.wait_closed(self.tcp_limits.timeout + 1.0)
        udp.close()
        tcp.close()
        self._threads, self._udp, self._tcp = [], None, None
        log.info("dns: stopped")

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cache_size(self) -> tuple[int, int]:
        """(entries, bytes) in the UDP answer caches, for tests and benchmarks."""
        caches = list(self._caches)
        return sum(len(c) for c in caches), sum(c.nbytes for c in caches)

    def zone(self) -> Zone:
        """The zone for the catalog's current index, rebuilt only when the index moved, and
        not sooner than :data:`REBUILD_WAIT` times the last rebuild after it. One query
        rebuilds it, outside ``self._lock``, and swaps it in whole;
        queries meanwhile are answered from the zone it replaces (the first build excepted:
        there is none, so they wait for it)."""
        zone = self._zone
        if zone.index == self.catalog.index or time.monotonic() < self._next_build:
            return zone
        if not self._building.acquire(blocking=not zone.loaded):
            return zone  # another query is rebuilding it
        try:
            zone = self._zone
            if zone.index != self.catalog.index and time.monotonic() >= self._next_build:
                start = time.monotonic()
                zone = Zone.from_catalog(self.catalog, self._warned, zone)
                end = time.monotonic()
                with self._lock:
                    self._zone = zone
                    self._next_build = end + min(REBUILD_WAIT * (end - start),
                                                 REBUILD_WAIT_MAX)
        finally:
            self._building.release()
        return zone

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        for attempt in range(20):  # with port 0: find one that is free for UDP and TCP both
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(OSError):
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                udp.bind((self.bind, self._requested_port))
                tcp.bind((self.bind, udp.getsockname()[1]))
                tcp.listen(128)
                return udp, tcp
            except OSError as exc:
                udp.close()
                tcp.close()
                if self._requested_port or attempt == 19:
                    raise ConfigError(f"dns: cannot listen on {self.bind} port "
                                      f"{self._requested_port}: {exc.strerror or exc}") from None
        raise AssertionError("unreachable")

    def _answer(self, data: bytes, tcp: bool, rotate: int = 0) -> Response | None:
        try:
            return respond(data, self.zone(), self.config, tcp=tcp, rotate=rotate)
        except Exception:  # a bug must not stop the server: SERVFAIL, and say so (rarely)
            self._error("dns: cannot answer a %d-byte request", len(data))
            if len(data) < 12 or data[2] & 0x80:
                return None
            head = bytes([data[0], data[1], 0x80 | (data[2] & 0x79), 2]) + bytes(8)
            return Response(head, "NONE", "SERVFAIL")

    def _told(self, resp: Response | None) -> None:
        """The query hook, told of one TCP answer (a failing hook is logged, rarely)."""
        if self.on_query is not None:
            try:
                self.on_query(*((resp.qtype, resp.rcode) if resp else ("NONE", "DROPPED")))
            except Exception:
                self._error("dns: on_query hook")

    def _error(self, msg: str, *args: object) -> None:  # (a bug must not flood the log)
        self._errors.warn("error", msg, *args, trace=True)

    def _serve_udp(self) -> None:
        sock = self._udp
        assert sock is not None
        recv, send, catalog, stopping = sock.recvfrom, sock.sendto, self.catalog, self._stopping
        cache = AnswerCache()
        self._caches.append(cache)
        get = cache.entries.get
        # each question's last turn, kept across the cache's clears (a catalog change clears
        # it: a name asked less often than the catalog changes still goes round its windows)
        turns: dict[bytes | None, int] = {}
        while not stopping.is_set():
            try:
                try:
                    data, addr = recv(65535)
                except BlockingIOError:  # SO_RCVTIMEO: nothing for POLL s
                    continue
                if not data:  # stop()'s wake-up, or an empty datagram: nothing to answer
                    if self.on_query is not None and not stopping.is_set():
                        self.on_query("NONE", "DROPPED")
                    continue
                if catalog.index != cache.index and (zone := self.zone()).index != cache.index:
                    cache.moved(zone)  # (the zone's index: it lags a storm of changes)
                key = cache_key(data)
                hit = None if key is None else get(key)
                if hit is not None and key is not None:  # the hot path: no parsing past labels
                    tails = hit[0]
                    turn = turns[key] = turns.get(key, 0) + 1  # this question's next turn
                    k = turn % len(tails)
                    tail = tails[k]
                    if tail is None:  # this turn's order or window, encoded once
                        resp = self._answer(data, tcp=False, rotate=k)
                        if resp is not None and resp.rcode == hit[2]:
                            tail = resp.wire[2:]
                            cache.fill(tails, k, tail)
                        else:
                            tail = tails[0]
                            assert tail is not None
                    send(echo(data, key, tail), addr)
                    if self.on_query is not None:
                        self.on_query(hit[1], hit[2])
                    continue
                if len(turns) > 2 * CACHE_ENTRIES:  # bounded: as many questions as the cache
                    turns.clear()
                resp = self._answer(data, tcp=False)
                if resp is None:
                    if self.on_query is not None:
                        self.on_query("NONE", "DROPPED")
                    continue
                wire, k = resp.wire, 0
                if key is not None and resp.rotations > 1:  # a miss takes its turn too
                    turn = turns[key] = turns.get(key, -1) + 1
                    k = turn % resp.rotations
                    turned = self._answer(data, tcp=False, rotate=k) if k else None
                    if turned is not None and turned.rcode == resp.rcode:
                        wire = turned.wire
                    else:
                        k = 0
                send(wire, addr)
                if key is not None and resp.rcode in CACHEABLE:
                    tails = cache.put(key, resp)
                    if k:
                        cache.fill(tails, k, wire[2:])
                if self.on_query is not None:
                    self.on_query(resp.qtype, resp.rcode)
            except OSError:  # a send refused (ICMP unreachable, buffer full): next one
                if stopping.is_set():
                    return
            except Exception:
                self._error("dns: udp loop")
