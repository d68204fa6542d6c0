"""Watches of an etcd registry's own keys, for those no watch of the registry follows.

As :mod:`~discovery.registry.zk_own` on ZooKeeper: a host with no watch of its own services
(``discovery agent`` alone, a router following other services) saw a key of its own deleted
or changed by hand only at its agent's next reconcile. Here one watch stream
(:class:`~discovery.registry.etcd_watch.EtcdWatch`) holds one watcher a key of its own, so
etcd sends the host only what happens to those keys, whatever the fleet's size. Its events go
to the write-back, which writes back only what is not its own value.

After a lost link it resumes from its revision, so nothing is missed, but **later** than the
host's other watches: at a random moment from 3 to 20 resume spreads after each loss (9 to 60
s at ``spread=3``). A watch of the host's services resumes with one watcher (wide); this one
re-creates one a key, about ten a host, and a fleet's restart re-created them all within one
spread: the members' peak rose from 2.1-2.8x their steady rate to 7.3-12.3x at 250-1,000
simulated hosts; resuming later, 2.3-2.7x over the minute after the restart (``bench/fleet.py``,
docs/benchmarks.md). Meanwhile another writer's change of a key is written back when the
stream is back (etcd replays it), or by the agent's reconcile if that comes first.

The keys change with the host's instances: the stream is replaced once the set has not
changed for ``settle`` seconds (a host starting 100 containers replaces it once, not 100
times; ``most`` s at the latest), each new one from etcd's revision then (never an old one,
which etcd may have compacted: a re-read would follow; but one waiting to resume, which owes
what happened since its revision, is replaced by one from there: etcd replays it), the old
one stopped only once the new one holds its watchers, so that nothing is missed in between.
A new key's change between its register and the moment its watcher holds (about ``settle``
s) is left to the agent's reconcile. When etcd has compacted the stream's revision
(a link down for long) or is behind it (a backup restored), it reads again the host's own
entries through the per-node index, not the services of its keys fleet-wide.

The registry URL's ``own=`` says how (:func:`own_keys`): ``keys`` as above; ``services``, a
watcher a service of those keys, which ``etcd grpc-proxy`` coalesces across hosts where it
cannot coalesce one a key (the members held every host's, and re-created them all at their
restart: 12-31x their steady rate); ``off``, no such watch (the agent's reconcile alone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol, cast

from discovery.model import id_node
from discovery.registry.base import Snapshot
from discovery.registry.etcd_index import read_node
from discovery.registry.etcd_read import Caller
from discovery.registry.etcd_source import WatchSource
from discovery.registry.etcd_watch import EtcdWatch
from discovery.registry.owned import OWN_LATER, unread

if TYPE_CHECKING:
    from discovery.registry.base import ChangeCallback
    from discovery.registry.owned import OwnWatch
    from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)
Key = tuple[str, str]
_DUE: frozenset[Key] = frozenset({("", "")})  # "watching" no set of keys: a replacement is due


class _Watch(Protocol):
    @property
    def revision(self) -> int: ...

    @property
    def resuming(self) -> bool: ...

    def stop(self) -> None: ...


class OwnKeys:
    """The keys it is handed (:meth:`only`), followed by one watch ``start(keys, since)`` (no
    keys, no watch; ``since``: 0, or the revision the watch it replaces had delivered when
    that one waits to resume: it owes what happened since),
    replaced once the set has not changed for ``settle`` s (``most`` s at the latest after the
    first change), the old one stopped once the new one holds its watchers. ``cover``: what a
    watch of a set of keys covers (default: those keys; :func:`by_service`): one is replaced
    only when it no longer covers the set."""

    def __init__(self, start: Callable[[frozenset[Key], int], _Watch], settle: float = 0.5,
                 most: float = 5.0, hold_wait: float = 5.0,
                 cover: Callable[[frozenset[Key]], frozenset[Key]] | None = None) -> None:
        self._start, self._settle, self._most, self._hold_wait = start, settle, most, hold_wait
        self._cover = cover or (lambda keys: keys)  # what a watch of keys covers
        self._lock = threading.Lock()  # the state; never held while calling out
        self._replacing = threading.Lock()  # one replacement at a time (start: the registry's)
        self._keys: set[Key] = set()
        self._watching: frozenset[Key] = frozenset()
        self._watch: _Watch | None = None
        self._timer: threading.Timer | None = None
        self._since = 0.0  # the first change the pending replacement waits for
        self._closed = False

    @property
    def keys(self) -> set[Key]:
        with self._lock:
            return set(self._keys)

    @property
    def holds(self) -> bool:
        """Whether the watch holds every key wanted (etcd answered each watcher's create)."""
        with self._lock:
            return self._covered() and (
                self._watch is None or self._watch.revision > 0)

    def only(self, keys: Collection[Key]) -> None:
        """Watch ``keys`` (the owned ones no watch of the registry follows), none else: after a
        register, a watch started, a reconcile's read."""
        with self._lock:
            gone = self._keys - set(keys)
        self._change(add=keys, remove=gone)

    def _change(self, add: Collection[Key] = (), remove: Collection[Key] = ()) -> None:
        with self._lock:
            if self._closed:
                return
            self._keys.update(add)
            self._keys.difference_update(remove)
            now = time.monotonic()
            if self._timer is not None:
                if not self._covered() and now - self._since >= self._most:
                    return  # due soon, as the set is then
                self._timer.cancel()  # the set changed again: settle from now
            elif self._covered():
                return
            else:
                self._since = now
            # none left: stopped at once. The first one waits too: in ``discovery up`` the
            # agent registers before its watcher's watch starts, which takes the keys over
            self._timer = threading.Timer(self._settle if self._keys else 0.0, self._replace)
            self._timer.daemon = True
            self._timer.start()

    def _covered(self) -> bool:
        """Whether the watch (being started) covers the keys wanted (the lock held)."""
        return self._cover(frozenset(self._keys)) == self._cover(self._watching)

    def _replace(self) -> None:
        with self._replacing:
            with self._lock:
                self._timer = None
                if self._closed or self._covered():
                    return
                keys, old = frozenset(self._keys), self._watch
            new: _Watch | None = None
            try:
                since = old.revision if old is not None and old.resuming else 0
                new = self._start(keys, since) if keys else None
            except Exception:  # (the registry closed meanwhile): the old one goes on
                log.exception("watching %d key(s) of our own failed", len(keys))
                return self._retry()
            if new is not None and old is not None:  # the old one covers until it holds
                deadline = time.monotonic() + self._hold_wait
                while new.revision == 0 and time.monotonic() < deadline and not self._closed:
                    time.sleep(0.01)
                if new.revision == 0 and not self._closed:  # not held (a member slow, the
                    new.stop()  # link cut): the old one goes on, and resumes; later again
                    return self._retry()
            with self._lock:
                closed = self._closed
                if not closed:
                    self._watch, self._watching = new, keys
            for stale in ((old, new) if closed else (old,)):
                if stale is not None:
                    stale.stop()
            self._change()  # the keys changed meanwhile (back to the old set, too): again

    def _retry(self) -> None:
        """The replacement again after ``hold_wait`` s (the old watch goes on meanwhile)."""
        with self._lock:
            self._watching = _DUE
            if self._closed or self._timer is not None:
                return
            self._since = time.monotonic()
            self._timer = threading.Timer(self._hold_wait, self._replace)
            self._timer.daemon = True
            self._timer.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timer = self._timer
            self._keys.clear()
        if timer is not None:
            timer.cancel()
        with self._replacing, self._lock:  # a replacement under way ends first
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()


class OwnSource(WatchSource, Protocol):
    @property
    def _call(self) -> Caller: ...  # (EtcdRegistry's: one request, retried until its timeout)


class _NodesRead:
    """``reg`` as a watch of its own keys sees it: a re-read (etcd compacted the watch's
    revision, or is behind it) reads the nodes those keys are of through their index
    (``etcd_index.read_node``, as ``node_snapshot`` reads but checks no watch for a rewind:
    this one, behind, is the one reading), not their services fleet-wide."""

    def __init__(self, reg: OwnSource, nodes: frozenset[str]) -> None:
        self._reg, self._nodes = reg, sorted(nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reg, name)

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        reg = self._reg
        reads = [read_node(reg._call, reg.client, reg.url, reg.decoder.decode, node,
                           reg.reads)[0] for node in self._nodes]
        return Snapshot({k: i for r in reads for k, i in r.instances.items()
                         if services is None or k[0] in services},
                        min(r.revision for r in reads),  # (a watch replays from the oldest)
                        unowned=frozenset().union(*(r.unowned for r in reads)))


def watch_keys(reg: OwnSource, callback: ChangeCallback, keys: frozenset[Key],
               since: int = 0) -> EtcdWatch:
    """One watch of ``keys`` (of ``reg``'s layout) from ``since`` + 1 (0: etcd's revision now);
    a re-read reads their nodes (``id_node``); after a lost link it resumes ``OWN_LATER``
    spreads later. With the URL's ``own=services``, a watcher a service of theirs instead of
    one a key: the watch a router of those services holds, which ``etcd grpc-proxy`` serves
    to every host from one watcher on the members (the host then receives, and drops, the
    changes of those services' other instances)."""
    nodes = frozenset(id_node(k[1]) for k in keys)
    services, spread = {k[0] for k in keys}, reg.url.resume_spread
    each = ([f"{reg.url.services_root}/{s}/" for s in services]  # prefixes
            if reg.url.own_watch == "services" else [reg.url.key(*k) for k in keys])
    return EtcdWatch(cast("WatchSource", _NodesRead(reg, nodes)), callback, since,
                     services, spread, keys=each,
                     later=(OWN_LATER[0] * spread, OWN_LATER[1] * spread))


def own_keys(reg: OwnSource, wrap: Callable[[ChangeCallback, Collection[str]], ChangeCallback],
             started: Callable[[EtcdWatch], EtcdWatch]) -> OwnKeys | None:
    """The watches of ``reg``'s own keys no watch of it follows (None with ``own=off``: the
    agent's reconcile alone), their events through ``wrap`` (the write-back's), each watch
    ``started`` (the registry's list of watches)."""
    if reg.url.own_watch == "off":
        return None
    return OwnKeys(lambda keys, since: started(watch_keys(
        reg, wrap(unread, {k[0] for k in keys}), keys, since)),
        cover=by_service if reg.url.own_watch == "services" else None)


def by_service(keys: frozenset[Key]) -> frozenset[Key]:
    """What a watch of ``keys`` with ``own=services`` covers: their (service, node) pairs (a
    watcher a service; a re-read of each node): a new key of both changes no watch."""
    return frozenset((k[0], id_node(k[1])) for k in keys)


def own_hint(url: RegistryURL, own: OwnWatch | None) -> str:
    """What a host whose etcd answers renewals as ``etcd grpc-proxy`` does may do: with
    ``own=keys`` (the default) and keys of its own watched alone (``own``), which a proxy
    cannot coalesce, use ``own=services``; "" if not so."""
    if url.own_watch != "keys" or own is None or not own.keys:
        return ""
    return ("behind a proxy, add own=services to the registry URL, so that it can coalesce "
            "this host's watches of its own entries (docs/operations.md, A fan-out tier)")
