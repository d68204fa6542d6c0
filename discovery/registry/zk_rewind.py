"""A ZooKeeper ensemble behind the zxid a client has seen: restored from a backup, or its data
lost and the ensemble started again empty.

Its members refuse the session of a client that has seen a later zxid than theirs ("client
must try another server": a lagging follower would hand it an older view), and kazoo tries
again forever: every host of the fleet would stay disconnected for good, the agents unable to
register, the catalogs frozen (measured: 30 s after a wipe of a 1-member ensemble, still
disconnected). A member that leads (or stands alone) holds everything the ensemble committed,
so if it and every other member that answers are behind our zxid, no member will ever take
our session back: :func:`ensemble_behind` tells so from ZooKeeper's ``srvr`` four-letter word
(on by default; over TLS on a TLS client port), and the registry then starts a session afresh
(as after an expiry).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Iterable

log = logging.getLogger(__name__)

SERVING = {"leader", "follower", "observer", "standalone"}
_ZXID = re.compile(r"^Zxid: (0x[0-9a-fA-F]+)\s*$", re.M)
_MODE = re.compile(r"^Mode: (\w+)\s*$", re.M)


def parse_srvr(text: str) -> tuple[str, int] | None:
    """``(mode, zxid)`` from a member's ``srvr`` answer; None unless it serves."""
    zxid, mode = _ZXID.search(text), _MODE.search(text)
    if zxid is None or mode is None or mode.group(1) not in SERVING:
        return None
    return mode.group(1), int(zxid.group(1), 16)


def four_letter(host: str, port: int, command: str, timeout: float,
                tls: ssl.SSLContext | None = None) -> str:
    """A ZooKeeper member's answer to a four-letter word (``srvr``, ``mntr``...), up to 1 MiB,
    over ``tls`` when given; raises OSError if it does not answer."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
        sock.sendall(command.encode())
        chunks: list[bytes] = []
        size = 0
        while size < 1 << 20 and (chunk := sock.recv(65536)):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def member_state(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None
                 ) -> tuple[str, int] | None:
    """``(mode, zxid)`` of the member at ``host:port`` (None: it does not answer, or does not
    serve)."""
    try:
        return parse_srvr(four_letter(host, port, "srvr", timeout, tls))
    except OSError:
        return None


def ensemble_behind(hosts: Iterable[tuple[str, int]], zxid: int, timeout: float = 1.0,
                    tls: ssl.SSLContext | None = None) -> bool:
    """Whether the ensemble is behind ``zxid`` for good: a member that leads (or stands
    alone) answers, and every member that answers is behind it."""
    states = [s for h, p in hosts if (s := member_state(h, p, timeout, tls)) is not None]
    return (any(mode in ("leader", "standalone") for mode, _ in states)
            and all(seen < zxid for _, seen in states))
