"""Counting by client, for the limits of the DNS and HTTP endpoints: whom a peer counts against
(:func:`client_of`: an IPv4 address, an IPv6 /64), :class:`Slots` capped in all and per
client (DNS TCP connections, HTTP connections, blocking queries), and :class:`Hushed`
warnings, said once a minute per cause rather than once per connection refused."""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from typing import NamedTuple

TOTAL, PER_CLIENT = "total", "per client"  # why a slot is refused


def client_of(peer: str) -> str:
    """Whom a peer counts against: its IPv4 address, or its IPv6 /64 (one host is usually
    given a whole /64, and picks any address in it); anything else as it is."""
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Refusal(NamedTuple):
    cause: str  # TOTAL or PER_CLIENT
    message: str  # what the client is told, and the log

    def __str__(self) -> str:
        return self.message


class Slots:
    """At most ``total`` held at once, and ``per_client`` per client (:func:`client_of`), so
    one host cannot take them all; ``what`` is held, for the refusals ("blocking queries")."""

    def __init__(self, total: int, per_client: int, what: str) -> None:
        self.total, self.per_client, self.what = total, per_client, what
        self._lock = threading.Lock()
        self._by_client: dict[str, int] = {}
        self.used = 0

    def acquire(self, peer: str) -> Refusal | None:
        """Take a slot for ``peer`` (an address); None when taken, else why not."""
        client = client_of(peer)
        with self._lock:
            mine = self._by_client.get(client, 0)
            if self.used >= self.total:
                return Refusal(TOTAL, f"too many {self.what} at once ({self.total}); "
                                      "retry later")
            if mine >= self.per_client:
                return Refusal(PER_CLIENT, f"too many {self.what} from {client} "
                                           f"({self.per_client} at once); retry later")
            self._by_client[client] = mine + 1
            self.used += 1
            return None

    def release(self, peer: str) -> None:
        client = client_of(peer)
        with self._lock:
            left = self._by_client.get(client, 0) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)
            self.used = max(0, self.used - 1)

    def of(self, peer: str) -> int:
        with self._lock:
            return self._by_client.get(client_of(peer), 0)


class Hushed:
    """Warnings said at most once per ``every`` seconds for each cause, each saying how many
    went unsaid since the one before (a flood of refusals is a line a minute, not a line per
    connection)."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.log, self.every = logger, every
        self._lock = threading.Lock()
        self._said: dict[str, tuple[float, int]] = {}  # cause -> (when said, unsaid since)

    def warn(self, cause: str, msg: str, *args: object, trace: bool = False) -> None:
        """``msg % args`` unless ``cause`` was said within ``every``; with ``trace``, as an
        error with the exception being handled (its traceback)."""
        now = time.monotonic()
        with self._lock:
            said, unsaid = self._said.get(cause, (-math.inf, 0))
            if now - said < self.every:
                self._said[cause] = (said, unsaid + 1)
                return
            self._said[cause] = (now, 0)
        (self.log.exception if trace else self.log.warning)(
            msg + " (said at most every %d s%s)", *args, self.every,
            f"; {unsaid} more since" if unsaid else "")
