"""Handing the DNS and HTTP listening sockets to the next process of a state dir, as HAProxy's
``-x`` does for its own: no query or connection meets a closed port during an upgrade.

A process leaving with SIGUSR2 (after it has let go of HAProxy) *offers* its listeners on the
unix socket ``<state-dir>/lookups.sock`` and keeps answering meanwhile. Its successor, started
on the same state dir with the same ``--dns``/``--http`` addresses, finds them busy, waits for
the offer, *takes* the sockets (``SCM_RIGHTS``: the same kernel sockets, with whatever is
queued on them), starts answering on them and acknowledges; only then does the leaving
process stop reading them and exit. Both answer for a moment, each query by exactly one of
them; a datagram or connection queued in the socket is read by whichever is there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from discovery.errors import ConfigError

log = logging.getLogger(__name__)

SOCKET_NAME = "lookups.sock"
OFFER_WAIT = 30.0  # a leaving process offers its listeners this long, then closes them
PREDECESSOR_WAIT = 10.0  # a starting process waits this long for a busy address's offer
ACK_WAIT = 30.0  # the successor acknowledges once it answers; said in the log if not by then
Listener = tuple[str, socket.socket]  # ("dns-udp" | "dns-tcp" | "http", its socket)


def offer(state_dir: Path, listeners: Sequence[Listener], wait: float = OFFER_WAIT,
          cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Offer ``listeners`` on ``<state_dir>/lookups.sock`` for ``wait`` s (or until
    ``cancelled()``); True once a successor took them and says it answers on them."""
    path = state_dir / SOCKET_NAME
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # left by a process that was killed
        server.bind(str(path))
        server.listen(1)
        server.settimeout(0.2)
        log.info("offering the DNS/HTTP listeners to the next process on %s for %.0f s",
                 path, wait)
        deadline = time.monotonic() + wait
        while True:
            if cancelled() or time.monotonic() > deadline:
                log.info("no process took the DNS/HTTP listeners: closing them")
                return False
            try:
                conn, _ = server.accept()
                break
            except TimeoutError:
                continue
    except OSError as exc:
        log.warning("cannot offer the DNS/HTTP listeners on %s: %s", path, exc)
        return False
    finally:
        server.close()
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    with conn:
        try:
            conn.settimeout(5.0)
            head = json.dumps([[name, list(sock.getsockname()[:2])] for name, sock in listeners])
            socket.send_fds(conn, [head.encode()], [sock.fileno() for _, sock in listeners])
            ok = _acknowledged(conn, cancelled)
        except OSError as exc:
            log.warning("handing the DNS/HTTP listeners over failed: %s", exc)
            return False
    log.info("the next process answers on the DNS/HTTP listeners: letting go"
             if ok else "the next process did not take the DNS/HTTP listeners")
    return ok


def _acknowledged(conn: socket.socket, cancelled: Callable[[], bool]) -> bool:
    """Whether the successor says it answers on the listeners (``ok``). Waited for while it
    holds the connection, unless ``cancelled()`` (SIGTERM: at once): it answers once its
    catalog is loaded, and a registry down during an upgrade left the sockets unread from
    ``ACK_WAIT`` on (queries queued, unanswered) while this process could answer them."""
    conn.settimeout(0.2)
    started, told = time.monotonic(), False
    while not cancelled():
        try:
            return conn.recv(16) == b"ok"  # b"": the successor is gone
        except TimeoutError:
            if not told and time.monotonic() - started >= ACK_WAIT:
                told = True
                log.warning("the next process does not answer on the DNS/HTTP listeners "
                            "after %.0f s (its catalog not loaded: its registry?): answering "
                            "on meanwhile", ACK_WAIT)
    return False


@dataclass
class Taken:
    """Listeners received from the previous process; :meth:`pop` the ones used, then
    :meth:`ack` (the previous process stops reading them and exits) and :meth:`close`."""

    conn: socket.socket
    sockets: dict[str, socket.socket] = field(default_factory=dict)

    def pop(self, name: str, bind: str, port: int) -> socket.socket | None:
        """The listener ``name`` if it is bound to ``bind``:``port`` (port 0: any)."""
        sock = self.sockets.get(name)
        if sock is None:
            return None
        host, got = sock.getsockname()[:2]
        if host != bind or (port and got != port):
            return None
        return self.sockets.pop(name)

    def ack(self) -> None:
        """Tell the previous process that this one answers; close what was not used."""
        with contextlib.suppress(OSError):
            self.conn.sendall(b"ok")
        self.close()

    def close(self) -> None:
        for sock in self.sockets.values():  # not wanted here (another address): closed
            sock.close()
        self.sockets.clear()
        self.conn.close()


def take(state_dir: Path) -> Taken | None:
    """The listeners offered on ``<state_dir>/lookups.sock``, or None if nobody offers."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5.0)
        conn.connect(str(state_dir / SOCKET_NAME))
        msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 8)
    except OSError:  # nobody offers (no socket, or one left by a killed process)
        conn.close()
        return None
    taken = Taken(conn)
    try:
        names = [name for name, _address in json.loads(msg)]
    except (ValueError, TypeError):
        names = []
    for i, fd in enumerate(fds):
        sock = socket.socket(fileno=fd)
        if i < len(names) and names[i] not in taken.sockets:
            taken.sockets[names[i]] = sock
        else:
            sock.close()
    log.info("took the DNS/HTTP listeners of the previous process: %s",
             ", ".join(sorted(taken.sockets)) or "none")
    return taken


def busy(addresses: Sequence[tuple[int, str, int]]) -> list[str]:
    """Those of ``(socket type, ip, port)`` bound by another socket now, as ``ip:port/tcp``
    (empty: all free)."""
    found = []
    for kind, ip, port in addresses:
        if not port:
            continue
        probe = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, kind)
        try:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                found.append(f"{where}/{'tcp' if kind == socket.SOCK_STREAM else 'udp'}")
        finally:
            probe.close()
    return found


def from_predecessor(state_dir: Path | None, addresses: Sequence[tuple[int, str, int]],
                     wait: float = PREDECESSOR_WAIT) -> Taken | None:
    """At start, before HAProxy is adopted: the listeners of a previous process that is
    leaving. None when the addresses are free (nobody to take over from). While one is busy,
    wait up to ``wait`` s for its offer (the previous process offers once it has let go of
    HAProxy); still busy then: ConfigError, as a bind would say."""
    if state_dir is None or not addresses:
        return None
    deadline = time.monotonic() + wait
    while True:
        taken = take(state_dir)
        if taken is not None:
            return taken
        held = busy(addresses)
        if not held:
            return None
        if time.monotonic() > deadline:
            raise ConfigError(f"cannot listen on {', '.join(held)}: address in use, and no process "
                              f"leaving it offers it on {state_dir / SOCKET_NAME} (stop the "
                              "one that has it with SIGUSR2 to hand it over)")
        time.sleep(0.05)
