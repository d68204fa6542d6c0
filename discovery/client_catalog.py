"""The client's live catalog: some services of a registry (or all of them), followed through
the watcher's wipe guard.

:class:`LiveCatalog` reads the services it is asked to follow once, then follows their changes
(one watch: a service added starts the watch again, its first read holding the services
followed, as a watcher does on SIGHUP). Every change goes through the wipe guard
(:mod:`discovery.watcher.guard`), timed by a thread of its own, so that a registry-side wipe
does not empty every process's catalog at once and no callback of the client delays it. Reads
of the registry are made outside the lock the watch's thread takes to apply a change (on etcd
that thread is also the one every read waits for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, Snapshot, Watch
from discovery.registry.succession import Succession
from discovery.watcher.guard import WipeGuard

log = logging.getLogger(__name__)

#: told (under the lock) which services a change touched; None: any
Touched = Callable[[set[str] | None], None]


class LiveCatalog:
    def __init__(self, registry: Registry, lock: threading.RLock, touched: Touched,
                 guarded: bool) -> None:
        self._registry, self._lock, self._touched = registry, lock, touched
        self._guarded = guarded
        self.catalog: Catalog | None = None  # None: following nothing yet
        self.services: frozenset[str] | None = None  # those followed; None: every one
        self._guard: WipeGuard | None = None
        self._watch: Watch | None = None
        self._watches = Succession()  # a stopped watch's late changes are dropped
        self._following = threading.Lock()  # one follow() at a time
        self._wake = threading.Event()  # the guard's timer: something deferred, or closing
        self._timer: threading.Thread | None = None
        self._closed = False

    def follows(self, service: str | None) -> bool:
        """Whether ``service`` (None: every one) is followed (under the lock)."""
        return self.catalog is not None and (
            self.services is None or (service is not None and service in self.services))

    def follow(self, services: frozenset[str] | None) -> None:
        """Follow ``services`` too (None: every service); raises what the read raises (the
        services followed before are followed on: their watch runs on while the read is made).
        The new watch reads first (``FIRST_READ``: on ZooKeeper its read is the one that arms
        its watches): its first change, a ``reset``, makes it the current one."""
        with self._following:
            with self._lock:
                if self._closed or (self._watch is not None and (self.follows(None) or (
                        services is not None and self.catalog is not None
                        and services <= (self.services or frozenset())))):
                    return
                now = self.services if self.catalog is not None else None
                want = None if services is None else services | (now or frozenset())
            # outside the lock: the reset, delivered before watch() returns, takes it
            number, watch = self._watches.make(self._registry, partial(self._on_change, want),
                                               want, self._lock)
            with self._lock:
                stale = self._closed or number != self._watches.current
                if not stale:
                    self._watch = watch
                    if self._guard is not None and self._timer is None:
                        self._timer = threading.Thread(target=self._time, daemon=True,
                                                       name="discovery-client-guard")
                        self._timer.start()
            if stale:
                watch.stop()
        log.debug("following %s", "every service" if want is None
                  else f"{len(want)} service(s)")

    def _on_change(self, services: frozenset[str] | None, number: int,
                   change: Change) -> None:
        """The watch's callback (a backend thread): through the wipe guard, then applied. The
        first change of a new watch, its read, makes it the current watch: it comes in
        ``follow``'s thread, within ``watch()``, where the old watch is stopped (so the registry
        lets it go as it adds the new one)."""
        old: Watch | None = None
        try:
            with self._lock:
                if self._closed:
                    return
                taken = self._watches.take(number, change)
                if taken == "first":
                    self.services = services
                    old, self._watch = self._watch, None
                if taken == "first" and self.catalog is None:
                    self.catalog = Catalog()
                    self.catalog.load(change.snapshot or Snapshot())
                    self._guard = WipeGuard(self.catalog) if self._guarded else None
                    self._touched(None)
                elif taken and self.catalog is not None:
                    guard = self._guard
                    self._apply(guard.filter(change) if guard is not None else [change])
                    if guard is not None and guard.next_due() is not None:
                        self._wake.set()
        finally:
            if old is not None:  # outside the lock: stopping joins the backend's thread
                old.stop()

    def _apply(self, changes: list[Change]) -> None:
        """(Under the lock.) Apply ``changes`` and tell which services they touched."""
        assert self.catalog is not None
        touched: set[str] | None = set()
        for change in changes:
            if self.catalog.apply(change) and touched is not None:
                touched = None if change.kind == "reset" else touched | {change.key[0]}
        if touched is None or touched:
            self._touched(touched)

    def _time(self) -> None:
        """The wipe guard's timer: its removals applied when due; while it holds anything, at
        least once a second (a wipe over, a service back: what it held may go then)."""
        assert self._guard is not None
        while True:
            with self._lock:
                if self._closed:
                    return
                due = self._guard.next_due()
                status = self._guard.status
            wait = 1.0 if status.holding or status.settling else None
            if due is not None:
                wait = min(wait or 1.0, max(0.0, due - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            try:
                with self._lock:
                    if self._closed:
                        return
                    self._apply(self._guard.due())
            except Exception:  # a bug: this timer must go on (what the guard holds would stay
                log.exception("client: the wipe guard's round failed; again in 1 s")
                self._wake.wait(1.0)  # held for good, and silently)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watch, self._watch = self._watch, None
        self._wake.set()
        if watch is not None:  # outside the lock: stopping joins the backend's thread
            watch.stop()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(5)
