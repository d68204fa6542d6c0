"""Watches of a ZooKeeper registry's own nodes, for those no watch of the registry follows.

The write-back (:mod:`~discovery.registry.owned`) rides on the host's watches: a host that
runs the agent alone (``discovery agent``), or a router that follows other services than its
own, saw a node of its own deleted or changed by hand only at its agent's next reconcile (up
to ``--resync`` + 10 %, 33 s by default), the service out of routing on every host meanwhile.
A watch of those services would cost the host every change of them, fleet-wide; this watches
the host's own nodes only: one one-shot watch a node, set by the read that follows each event
(so the value seen is handed to the write-back, which writes back only what is not its own).
The host's cost stays its own instances', whatever the fleet's size:

- a node written (a register, a write-back, a session's recovery): one read, with a watch;
- a node of ours changed or deleted (by us or another writer): one read, with a watch (an
  ``exists`` one if it is gone);
- a lost connection (kazoo drops every watch): one ``SetWatches`` (:mod:`~discovery.registry.
  zk_rewatch`) from the zxid seen, so ZooKeeper tells only what changed meanwhile, at a
  random moment from 3 to 20 resume spreads after the reconnect (``owned.OWN_LATER``): after
  the fleet's other resumes, not among them; a new session: the registry's recovery writes
  every node again, then one ``SetWatches`` from there (``rearm``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Collection
from typing import Any

from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import EventType, KazooState

from discovery.model import Instance
from discovery.registry.base import Change, ChangeCallback
from discovery.registry.owned import OWN_LATER
from discovery.registry.zk_rewatch import rewatch

log = logging.getLogger(__name__)
Key = tuple[str, str]


class OwnNodes:
    """``client``'s watches of the nodes of the keys it is told to ``want`` (at ``path_of(key)``:
    None, no node known), each event's node read and handed to ``seen`` as a ``put`` (decoded
    by ``decode(path, data, stamp)``; ``unowned`` when no session holds it) or a ``delete``.
    ``spread``: the registry URL's resume spread (the re-arm after a reconnect waits)."""

    def __init__(self, client: Any, path_of: Callable[[Key], str | None],
                 decode: Callable[[str, bytes, float], Instance | None], seen: ChangeCallback,
                 timeout: float, spread: float = 0.0) -> None:
        self._client, self._path_of, self._decode = client, path_of, decode
        self._seen, self._timeout = seen, timeout
        self._later = (OWN_LATER[0] * spread, OWN_LATER[1] * spread)
        self._timer: threading.Timer | None = None  # the re-arm due
        self._lock = threading.Lock()
        self._paths: dict[str, Key] = {}  # watched path -> its key
        self._answered: set[str] = set()  # paths read (with their watch) since wanted
        self._keys: dict[Key, str] = {}
        self._zxid = 0  # the last zxid seen when the connection went (0: it did not)
        self._drops = 0  # the connection's losses: a re-arm answered before a later one
        self._lost = False  # the session expired: the recovery's rearm() re-arms them all
        self._closed = False
        client.add_listener(self._on_state)

    @property
    def keys(self) -> set[Key]:
        with self._lock:
            return set(self._keys)

    @property
    def holds(self) -> bool:
        """Whether every node wanted was read with its watch (or found gone) once."""
        with self._lock:
            return self._answered.issuperset(self._paths)

    def want(self, key: Key) -> None:
        """Watch ``key``'s node (again, if its path changed: Nerve's layout after a new claim)."""
        with self._lock:  # (the path read under it: a stale one never wins)
            path = self._path_of(key)
            if self._closed or path is None or self._keys.get(key) == path:
                return
            if (old := self._keys.get(key)) is not None:
                self._paths.pop(old, None)
            self._keys[key], self._paths[path] = path, key
            self._answered.discard(path)
        self._look(path)

    def only(self, keys: Collection[Key]) -> None:
        """Watch ``keys`` (the owned ones no watch of the registry follows), none else: after a
        register, a watch started, a reconcile's read."""
        for key in self.keys - set(keys):
            self.drop(key)
        for key in keys:
            self.want(key)

    def drop(self, key: Key) -> None:
        """No longer ``key``'s (its deregister): its watch fires once more, unread."""
        with self._lock:
            if (path := self._keys.pop(key, None)) is not None:
                self._paths.pop(path, None)
                self._answered.discard(path)

    def rearm(self, zxid: int) -> None:
        """After a new session's recovery wrote every node again (its transaction answered at
        ``zxid``): all watched anew, in one ``SetWatches`` from there (a node changed since
        fires at once)."""
        with self._lock:
            self._paths = {p: k for k in self._keys if (p := self._path_of(k)) is not None}
            self._keys = {k: p for p, k in self._paths.items()}
            self._answered.clear()
        self._rewatch(zxid)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._keys.clear()
            self._paths.clear()
            self._answered.clear()
            timer, self._timer = self._timer, None
        self._client.remove_listener(self._on_state)
        if timer is not None:
            timer.cancel()

    def _look(self, path: str) -> None:
        """Read ``path`` with a watch; the answer goes to ``seen`` (a missing node: an
        ``exists`` watch, and a ``delete``)."""
        with contextlib.suppress(KazooException):  # not connected: the reconnect re-arms
            self._client.get_async(path, watch=self._fired).rawlink(
                lambda result: self._got(path, result))

    def _got(self, path: str, result: Any) -> None:
        with self._lock:
            key = self._paths.get(path)
        if key is None:
            return
        try:
            data, stat = result.get()
        except NoNodeError:  # an exists watch for its return, and told at once
            with contextlib.suppress(KazooException):  # (closed: nothing to watch)
                self._client.exists_async(path, watch=self._fired).rawlink(
                    lambda exists: self._gone(path, exists))
            self._seen(Change("delete", key=key))
            return
        except KazooException:  # the connection went: the reconnect re-arms
            return
        inst = self._decode(path, data, stat.mtime / 1000)
        if inst is not None and inst.key == key:
            self._seen(Change("put", key=key, instance=inst, revision=stat.mzxid,
                              unowned=stat.ephemeralOwner == 0))
        with self._lock:
            self._answered.add(path)

    def _gone(self, path: str, exists: Any) -> None:
        try:
            stat = exists.get()
        except KazooException:
            return
        if stat is not None:  # created again meanwhile: read it
            self._look(path)
        with self._lock:
            self._answered.add(path)

    def _fired(self, event: Any) -> None:
        """kazoo's watcher: a node of ours changed or went (read again), or the connection
        went (``NONE``: kazoo dropped every watch; :meth:`_on_state` re-arms them)."""
        if event.type == EventType.NONE:
            return
        with self._lock:
            wanted = event.path in self._paths
        if wanted:
            self._look(event.path)

    def _on_state(self, state: str) -> None:
        """kazoo's listener (its connection thread): a lost link notes the zxid seen; back on
        the same session, one ``SetWatches`` from there, ``OWN_LATER`` spreads later (a timer:
        one due at a time, from the earliest zxid not re-armed when it fires; none after a
        session's loss, whose recovery re-arms them)."""
        with self._lock:
            if state == KazooState.SUSPENDED:  # the earliest until a re-arm succeeds
                self._zxid = self._zxid or self._client.last_zxid
                self._drops += 1
                return
            if state == KazooState.LOST:  # the recovery re-arms them (rearm): none due
                self._lost, self._zxid = True, 0
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                return
            zxid, lost, self._lost = self._zxid, self._lost, False
            if (state != KazooState.CONNECTED or not zxid or lost or self._closed
                    or self._timer is not None):  # (one due: a flapping link defers it not)
                return
            timer = self._timer = threading.Timer(random.uniform(*self._later), self._due)
        timer.daemon, timer.name = True, "zk-own-rewatch"
        timer.start()

    def _due(self) -> None:
        """The re-arm falls due: from the earliest zxid not re-armed (a link lost meanwhile:
        it fails, and the reconnect sets the next one)."""
        with self._lock:
            if self._timer is not threading.current_thread():  # (cancelled meanwhile)
                return
            self._timer = None
            zxid, drops = self._zxid, self._drops
            if not zxid or self._closed:
                return
        self._rearm_from(zxid, drops)

    def _rearm_from(self, zxid: int, drops: int) -> None:
        if self._rewatch(zxid):
            with self._lock:
                if self._drops == drops:  # (else the link went again: its own re-arm)
                    self._zxid = 0

    def _rewatch(self, zxid: int) -> bool:
        """One ``SetWatches`` of every node wanted, from ``zxid``: whether it was answered."""
        with self._lock:
            paths = list(self._paths)
        if not paths:
            return True
        try:
            rewatch(self._client, zxid, dict.fromkeys(paths, self._fired), {}, self._timeout)
        except Exception as exc:  # the link went again (or timed out): its reconnect re-arms
            log.info("re-arming the watches of %d node(s) of ours: %s", len(paths), exc)
            return False
        with self._lock:
            self._answered.update(p for p in paths if p in self._paths)
        return True
