"""Writing back what another writer deleted: an entry this registry owns, gone from under it.

The agent is the truth about its own node (as Consul's agent is, by anti-entropy). Before
this, an entry deleted by hand under a live lease or session (``etcdctl del --prefix``, a
ZooKeeper ``deleteall``, a service's directory removed) came back only at its agent's next
reconcile (``--resync``, 30 s ±10 %): the service it was the last of was out of routing on
every host meanwhile, and a prefix deleted under a whole fleet outlasted the watchers' wipe
guard (``hold``, 30 s) on the hosts whose agents came last.

A watch of the registry that delivers the delete of an entry the registry owns (its own
deregister forgets the entry first, so that delete is not one), or a ``reset`` whose snapshot
lacks one, hands the key to :class:`Restorer`, which after a random wait within the URL's
``spread=`` (3 s) has the backend write it back **only if it is still owned and still
missing** (etcd: a transaction comparing its version with 0; ZooKeeper: a create after a
read of the node), so an entry put back meanwhile (a session recovery, the lease's keeper,
the agent's reconcile) is not written twice: each write reaches every host of the fleet. The
wait spreads a fleet whose entries went at once over that window.

It costs nothing in the steady state: it rides on the watches the host has anyway
(``discovery up``: the agent and the watcher share one registry client). Only entries those
watches follow are seen (a router following k services: its own instances of those); an
agent with no watch puts back at its next reconcile, as before.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Collection, Set
from typing import Any

from discovery.errors import RegistryError
from discovery.registry.base import Change, ChangeCallback
from discovery.retry import spread

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Restorer:
    """The keys of owned entries seen deleted, each written back (``restore(key)``, a
    conditional write) after a random wait within ``window`` s; one thread, started at the
    first key. ``owned``: the registry's owned entries, by key."""

    def __init__(self, owned: dict[Key, Any], restore: Callable[[Key], bool],
                 window: float, name: str) -> None:
        self._owned, self._restore, self._window, self._name = owned, restore, window, name
        self._cond = threading.Condition()
        self._due: dict[Key, float] = {}
        self._heap: list[tuple[float, Key]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.restored = 0  # entries written back (the others were there again, or not ours)

    def wrap(self, callback: ChangeCallback,
             services: Collection[str] | None = None) -> ChangeCallback:
        """``callback`` for a watch (of ``services``, None: all), telling this of what it sees."""
        scope = None if services is None else frozenset(services)

        def seen(change: Change) -> None:
            if change.kind == "delete":
                self.lost([change.key])
            elif change.kind == "reset" and (snap := change.snapshot) is not None:
                self.lost([k for k in self._keys() if (scope is None or k[0] in scope)
                           and k not in snap.instances and not snap.keeps(k)])
            callback(change)

        return seen

    def lost(self, keys: Collection[Key]) -> None:
        """From any thread: ``keys`` were seen gone; those the registry owns are looked at
        after their wait (a key waiting already keeps its turn)."""
        owned = self._keys() if keys else set()
        keys = [k for k in keys if k in owned]
        if not keys:
            return
        with self._cond:
            if self._closed:
                return
            for key in keys:
                if key not in self._due:
                    due = time.monotonic() + spread(self._window)
                    self._due[key] = due
                    heapq.heappush(self._heap, (due, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"{self._name}-restore")
                self._thread.start()
            self._cond.notify()

    def _keys(self) -> Set[Key]:
        """The owned keys now, without the registry's lock: a watch delivers on a thread that
        must never wait for it (etcd's: the loop, on which that lock's holder may be waiting
        for a call). The registry changes them under that lock; one ``dict.copy()`` is atomic
        under the GIL."""
        return self._owned.copy().keys()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _next(self) -> Key | None:
        """The next key whose time has come (waiting for it), None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (key := self._next()) is not None:
            try:
                if self._restore(key):
                    self.restored += 1
                    log.warning("%s/%s of this node was deleted in the registry by another "
                                "writer; written back", *key)
            except RegistryError as exc:  # the agent's next reconcile writes it
                log.warning("writing back %s/%s, deleted by another writer: %s", *key, exc)
            except Exception:
                log.exception("writing back %s/%s failed", *key)
