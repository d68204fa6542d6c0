"""DNS over TCP (:class:`~discovery.lookup.dns.DnsServer`'s): the accept loop and one thread
per open connection, within :class:`~discovery.lookup.dns_limits.TcpLimits` (in all and per
client, IPv6 by /64: :class:`~discovery.lookup.peers.Slots`); each message must come whole
within the limit's ``timeout`` of the accept or the previous answer, however slowly sent.
A connection that gets no thread (the pids limit) is closed and its slot given back.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from discovery.lookup.dns_limits import TcpLimits
from discovery.lookup.dns_wire import Response
from discovery.lookup.peers import Hushed, Slots

log = logging.getLogger(__name__)

POLL = 0.2  # s: how soon an idle accept loop notices its stop


class TcpConnections:
    """The open TCP connections of one DNS server: ``answer(data)`` gives each message's
    response (None: hang up), ``told(response)`` is called after each (the query hook),
    ``error(msg)`` logs a failure (rarely)."""

    def __init__(self, limits: TcpLimits, answer: Callable[[bytes], Response | None],
                 told: Callable[[Response | None], None], error: Callable[[str], None]) -> None:
        self.limits = limits
        self._answer, self._told, self._error = answer, told, error
        self._conns: dict[socket.socket, str] = {}  # open connections -> their peer
        self._slots = Slots(limits.connections, limits.per_client, "tcp connections")
        self._refusals = Hushed(log)
        self._lock = threading.Lock()
        self._closed = threading.Condition(self._lock)  # a connection ended

    def serve(self, sock: socket.socket, stopping: threading.Event) -> None:
        """Accept on ``sock`` (non-blocking: another process may accept too) until ``stopping``."""
        while not stopping.is_set():
            try:
                if not select.select([sock], [], [], POLL)[0]:
                    continue
                conn, peer = sock.accept()
            except BlockingIOError:
                continue
            except OSError:
                if stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            address = str(peer[0])
            refused = self._slots.acquire(address)
            if refused is not None:
                conn.close()
                self._refusals.warn(refused.cause, "dns: tcp connection from %s refused: %s",
                                    address, refused)
                continue
            with self._lock:
                self._conns[conn] = address
            try:
                threading.Thread(target=self._serve_conn, args=(conn,), name="dns-tcp-conn",
                                 daemon=True).start()
            except RuntimeError as exc:  # no thread (the pids limit): closed, the loop goes on
                self._refusals.warn("threads", "dns: tcp connection from %s closed: %s",
                                    address, exc)
                self._drop(conn)

    def shut_all(self) -> None:
        """Shut every open connection (a stop that hands nothing over)."""
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def wait_closed(self, timeout: float) -> None:
        """Until every open connection has ended (a hand-over: served to their end)."""
        with self._closed:
            self._closed.wait_for(lambda: not self._conns, timeout)

    def _serve_conn(self, conn: socket.socket) -> None:
        timeout = self.limits.timeout
        try:
            while True:  # until the client closes, goes idle, or stop() shuts the connection
                deadline = time.monotonic() + timeout  # for the whole message, however sent
                head = _recv_exact(conn, 2, deadline)
                if head is None:
                    return
                data = _recv_exact(conn, int.from_bytes(head, "big"), deadline)
                if data is None:
                    return
                resp = self._answer(data)
                if resp is not None:
                    conn.settimeout(timeout)  # for sendall: in all, not per send
                    conn.sendall(len(resp.wire).to_bytes(2, "big") + resp.wire)
                self._told(resp)
                if resp is None:
                    return  # not a DNS query: hang up
        except TimeoutError:
            log.debug("dns: tcp connection cut: no whole message within %.1f s", timeout)
        except OSError:
            pass  # reset, or stopped
        except Exception:
            self._error("dns: tcp connection")
        finally:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        """A connection done with: its slot given back, closed."""
        with self._lock:
            address = self._conns.pop(conn, None)
            self._closed.notify_all()
        if address is not None:
            self._slots.release(address)
        conn.close()


def _recv_exact(conn: socket.socket, size: int, deadline: float) -> bytes | None:
    """``size`` bytes by ``deadline`` (else TimeoutError), or None when the peer closed first."""
    buf = bytearray()
    while len(buf) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
