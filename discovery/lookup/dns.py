"""The DNS endpoint: UDP and TCP listeners answering from the watcher's catalog.

``DnsServer(catalog, bind, port, domain, ttl, on_query).start()`` runs one UDP thread and one
TCP accept thread (plus one thread per open TCP connection, at most ``MAX_TCP_CONNECTIONS``).
What is answered and how is :mod:`discovery.lookup.dns_wire`; this module moves bytes.

Hot path (UDP): a response depends only on the request minus its 2-byte ID and on the catalog
index, so encoded responses are cached by ``request[2:]`` while the index stays the same, and a
hit is ``id + cached tail`` with no parsing at all. Responses with several records come in up to
``MAX_ROTATIONS`` orders, served in turn (round-robin, as most resolvers take the first address).
Anything malformed is answered (FORMERR, NOTIMP) or dropped and never stops the loop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

from discovery.errors import ConfigError, ValidationError
from discovery.lookup.dns_wire import DnsConfig, Response, Zone, respond
from discovery.model import validate as v
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_PORT = 8600
CACHE_ENTRIES = 4096  # distinct requests cached per catalog index; cleared when full
MAX_TCP_CONNECTIONS = 64
TCP_IDLE = 10.0  # seconds a TCP connection may sit idle (RFC 7766 suggests at least a few)
UDP_RCVBUF = 4 << 20
ERROR_LOG_EVERY = 60.0
CACHEABLE = frozenset({"NOERROR", "NXDOMAIN"})  # not errors: anyone can send those

QueryHook = Callable[[str, str], None]


def parse_listen(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``127.0.0.1:8600``, ``[::1]:8600``, ``127.0.0.1`` or ``:8600`` → (address, port)."""
    return v.listen("dns listen address", value, default_port, port_zero=True)


class DnsServer:
    """Answers DNS queries from ``catalog`` on ``bind``:``port`` (UDP and TCP)."""

    def __init__(self, catalog: Catalog, bind: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 domain: str = "discovery.", ttl: int = 0,
                 on_query: QueryHook | None = None, *, udp_threads: int = 1) -> None:
        self.catalog = catalog
        self.config = DnsConfig(domain, ttl)
        try:
            self.bind = v.address("dns bind address", bind)
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
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._zone = Zone((), -1)
        self._stopping = threading.Event()
        self._last_error = 0.0

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0); the requested one before start()."""
        if self._udp is None:
            return self._requested_port
        port: int = self._udp.getsockname()[1]
        return port

    def start(self) -> DnsServer:
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        self._stopping.clear()
        self._udp, self._tcp = self._bind()
        names = [f"dns-udp-{i}" for i in range(self._udp_threads)]
        targets: list[tuple[str, Callable[[], None]]] = [(n, self._serve_udp) for n in names]
        targets.append(("dns-tcp", self._serve_tcp))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("dns: answering for %s on %s port %d (udp, tcp), ttl %d",
                 self.config.domain, self.bind, self.port, self.config.ttl)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop answering; returns once every listener thread has ended (or ``timeout``)."""
        udp, tcp = self._udp, self._tcp
        if udp is None or tcp is None:
            return
        self._stopping.set()
        wake = ("127.0.0.1" if self._family == socket.AF_INET else "::1") \
            if self.bind in ("0.0.0.0", "::") else self.bind
        for _ in self._threads:  # one empty datagram per UDP thread wakes it up
            with contextlib.suppress(OSError):
                udp.sendto(b"", (wake, self.port))
        with contextlib.suppress(OSError):
            tcp.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        udp.close()
        tcp.close()
        self._threads, self._udp, self._tcp = [], None, None
        log.info("dns: stopped")

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def zone(self) -> Zone:
        """The zone for the catalog's current index, rebuilt only when the index moved."""
        zone = self._zone
        if zone.index != self.catalog.index:
            with self._lock:
                zone = self._zone
                if zone.index != self.catalog.index:
                    zone = self._zone = Zone.from_catalog(self.catalog)
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

    def _error(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_error >= ERROR_LOG_EVERY:
            self._last_error = now
            log.exception(msg, *args)

    def _serve_udp(self) -> None:
        sock = self._udp
        assert sock is not None
        recv, send, catalog, stopping = sock.recvfrom, sock.sendto, self.catalog, self._stopping
        cache: dict[bytes, tuple[tuple[bytes, ...], str, str]] = {}
        get = cache.get
        index, turn = -1, 0
        while True:
            try:
                data, addr = recv(65535)
                if catalog.index != index:
                    cache.clear()
                    index = catalog.index
                hit = get(data[2:])
                if hit is not None:  # the hot path: no parsing at all
                    tails = hit[0]
                    turn += 1
                    send(data[:2] + tails[turn % len(tails)], addr)
                    if self.on_query is not None:
                        self.on_query(hit[1], hit[2])
                    continue
                if stopping.is_set():
                    return
                resp = self._answer(data, tcp=False)
                if resp is None:
                    if self.on_query is not None:
                        self.on_query("NONE", "DROPPED")
                    continue
                send(resp.wire, addr)
                if resp.rcode in CACHEABLE:
                    if len(cache) >= CACHE_ENTRIES:
                        cache.clear()
                    tails = (resp.wire[2:], *self._rotations(data, resp))
                    cache[data[2:]] = (tails, resp.qtype, resp.rcode)
                if self.on_query is not None:
                    self.on_query(resp.qtype, resp.rcode)
            except OSError:  # a send refused (ICMP unreachable, buffer full): next one
                if stopping.is_set():
                    return
            except Exception:
                self._error("dns: udp loop")

    def _rotations(self, data: bytes, first: Response) -> list[bytes]:
        out = []
        for turn in range(1, first.rotations):
            resp = self._answer(data, tcp=False, rotate=turn)
            if resp is not None:
                out.append(resp.wire[2:])
        return out

    def _serve_tcp(self) -> None:
        sock = self._tcp
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                if len(self._conns) >= MAX_TCP_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), name="dns-tcp-conn",
                             daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(TCP_IDLE)
            while not self._stopping.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                data = _recv_exact(conn, int.from_bytes(head, "big"))
                if data is None:
                    return
                resp = self._answer(data, tcp=True)
                if resp is not None:
                    conn.sendall(len(resp.wire).to_bytes(2, "big") + resp.wire)
                if self.on_query is not None:
                    try:
                        self.on_query(*((resp.qtype, resp.rcode) if resp else ("NONE", "DROPPED")))
                    except Exception:
                        self._error("dns: on_query hook")
                if resp is None:
                    return  # not a DNS query: hang up
        except OSError:
            pass  # timed out, reset, or stopped
        except Exception:
            self._error("dns: tcp connection")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None when the peer closed first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
