"""What a daemon asks of glibc's allocator: few arenas, and freed memory back every 10 s.

A sidecar's memory is part of its cost on every host (issue 11: ``discovery up`` within
80 MB with a 10,000-instance catalog; docs/benchmarks.md, "Per-host footprint"). Without
glibc (or its ``mallopt`` / ``malloc_trim``) both do nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from typing import Any

#: malloc arenas of a daemon unless ``MALLOC_ARENA_MAX`` says otherwise: glibc's default (8 a
#: core) keeps each thread's freed memory in an arena of its own; with 2, ``discovery up`` (100
#: containers, a 10,100-instance catalog) holds ~5 MB less (docs/benchmarks.md, footprint)
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def _libc(libc: Any) -> Any:
    if libc is not None:
        return libc
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def fewer_malloc_arenas(environ: Mapping[str, str] = os.environ, libc: Any = None) -> bool:
    """At most :data:`MALLOC_ARENAS` glibc malloc arenas from now on, before any thread
    starts; not when ``MALLOC_ARENA_MAX`` is set (glibc read it at start) or without glibc's
    ``mallopt``. True when it was set."""
    if "MALLOC_ARENA_MAX" in environ:
        return False
    mallopt = getattr(_libc(libc), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


#: seconds between two :func:`give_back` of a daemon (:func:`keep_giving_back`)
GIVE_BACK_EVERY = 10.0


def give_back(libc: Any = None) -> bool:
    """The heap's free pages back to the system (``malloc_trim(0)``). glibc keeps what a
    burst of work freed (a snapshot decoded, containers inspected, a DNS zone or the whole
    catalog's answer built) in the process's RSS for good: 4.3 MB of ``discovery up``'s at
    10,000 instances, once its 100 containers had started. True when glibc gave some back."""
    trim = getattr(_libc(libc), "malloc_trim", None)
    return trim is not None and bool(trim(0))


def keep_giving_back(every: float = GIVE_BACK_EVERY, stop: threading.Event | None = None,
                     libc: Any = None) -> threading.Thread | None:
    """A daemon thread that calls :func:`give_back` every ``every`` s (a millisecond or so
    each) until ``stop`` is set; None without glibc's ``malloc_trim``."""
    lib = _libc(libc)
    if getattr(lib, "malloc_trim", None) is None:
        return None
    done = stop or threading.Event()

    def run() -> None:
        while not done.wait(every):
            give_back(lib)

    thread = threading.Thread(target=run, name="heap-give-back", daemon=True)
    thread.start()
    return thread
