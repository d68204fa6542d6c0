"""One deadline for every registry request of one call.

A registry gives each request its ``timeout`` (etcd: each tried again on other members until
then), so a call that makes several (a read counted then read, paged, started again after a
compaction; a ZooKeeper read's directory, listings, then nodes) could take a multiple of it.
Within :func:`within`, every request the thread makes is given what remains of one deadline
instead (:func:`remaining`), and a call fails once it is spent: each call of
:class:`discovery.client.Client` that reads the registry runs in one. Thread-local, not a
context variable: a watch's task started in the block (asyncio copies the context into it)
must not inherit a spent deadline.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """The registry requests this thread makes in the block end ``seconds`` from now at the
    latest, all of them together (or sooner: the deadline of an enclosing block)."""
    outer: float | None = getattr(_local, "ends", None)
    ends = time.monotonic() + seconds
    _local.ends = ends if outer is None else min(outer, ends)
    try:
        yield
    finally:
        _local.ends = outer


def remaining(seconds: float) -> float:
    """``seconds``, or what remains of this thread's :func:`within` deadline if that is less
    (0 once it is spent)."""
    ends: float | None = getattr(_local, "ends", None)
    if ends is None:
        return seconds
    return max(0.0, min(seconds, ends - time.monotonic()))


def cut(seconds: float | None) -> float | None:
    """:func:`remaining` of a request's own timeout, which may be None (no limit)."""
    if seconds is None and getattr(_local, "ends", None) is None:
        return None
    return remaining(math.inf if seconds is None else seconds)
