"""What a fleet worker's ZooKeeper hosts send, by request type and by moment (client side).

ZooKeeper's ``mntr`` counts the packets a member received, not their kind, so the fleet
bench's ZooKeeper rows could not say which requests make a restart's peak. :func:`install`
wraps kazoo's ``ConnectionHandler._submit``, through which every request of every client in the
process goes (``Connect``, ``Ping``, ``SetWatches``, reads, writes, ``Auth``), and notes the
request's type in a bucket of :data:`BUCKET_S`. The parent asks each worker for its buckets
(:meth:`RequestLog.since`) and adds them up (:func:`merge`, :func:`by_type_between`).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

BUCKET_S = 0.25


class RequestLog:
    """Request type names, ``(bucket, name)`` in the order sent; ``append`` of a deque is
    atomic, so the hosts' threads (or greenlets) need no lock."""

    def __init__(self, keep: int = 2_000_000, clock: Callable[[], float] = time.time) -> None:
        self._sent: deque[tuple[int, str]] = deque(maxlen=keep)
        self._clock = clock

    def note(self, request: Any) -> None:
        self._sent.append((int(self._clock() / BUCKET_S), type(request).__name__))

    def since(self, t0: float) -> list[list[Any]]:
        """``[bucket start (UNIX s), type, count]`` from ``t0`` on, in time order."""
        first = int(t0 / BUCKET_S)
        counts = Counter(item for item in list(self._sent) if item[0] >= first)
        return [[b * BUCKET_S, name, n] for (b, name), n in sorted(counts.items())]


def install(log: RequestLog, handler: Any = None) -> None:
    """Note every request kazoo sends in this process in ``log`` (through ``handler``'s
    ``_submit``: kazoo's ``ConnectionHandler`` unless told)."""
    if handler is None:
        from kazoo.protocol.connection import ConnectionHandler

        handler = ConnectionHandler
    original = handler._submit

    def submit(self: Any, request: Any, timeout: float, xid: int | None = None) -> Any:
        log.note(request)
        return original(self, request, timeout, xid)

    handler._submit = submit


def merge(replies: Iterable[list[list[Any]]]) -> list[list[Any]]:
    """The workers' :meth:`RequestLog.since` answers as one, in time order."""
    counts: Counter[tuple[float, str]] = Counter()
    for rows in replies:
        for t, name, n in rows:
            counts[(t, name)] += n
    return [[t, name, n] for (t, name), n in sorted(counts.items())]


def by_type_between(rows: Iterable[list[Any]], t0: float, t1: float) -> dict[str, int]:
    """Requests by type in the buckets that start within ``[t0, t1)``."""
    out: Counter[str] = Counter()
    for t, name, n in rows:
        if t0 <= t < t1:
            out[name] += n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def per_second(rows: Iterable[list[Any]], t0: float) -> list[list[Any]]:
    """``[second after t0, requests, {type: n}]`` for each whole second that has any."""
    bins: dict[int, Counter[str]] = {}
    for t, name, n in rows:
        if t >= t0:
            bins.setdefault(int(t - t0), Counter())[name] += n
    return [[s, sum(c.values()), dict(c)] for s, c in sorted(bins.items())]
