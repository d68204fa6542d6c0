"""Writing back what another writer deleted or changed: an entry this registry owns.

The agent is the truth about its own node (as Consul's agent is, by anti-entropy). Before
this, an entry deleted by hand under a live lease or session (``etcdctl del --prefix``, a
ZooKeeper ``deleteall``, a service's directory removed) came back only at its agent's next
reconcile (``--resync``, 30 s ±10 %): the service it was the last of was out of routing on
every host meanwhile, and a prefix deleted under a whole fleet outlasted the watchers' wipe
guard (``hold``, then 30 s) on the hosts whose agents came last.

The same holds for a value changed by hand (``etcdctl put`` of ``"state": "draining"`` or
weight 0 over a fleet's instances, a ZooKeeper ``set``): every host's watcher drained them
at once, until each agent's reconcile.

A watch of the registry that delivers the delete of an entry the registry owns (its own
deregister forgets the entry first, so that delete is not one), a put of one whose value is not
what the registry wrote (:meth:`Restorer.same`: apart from write stamps, and as the layout
carries it: Nerve's record holds less), or a ``reset`` whose snapshot lacks one or holds it
changed, hands the key to :class:`Restorer`, which after a random wait within the URL's
``spread=`` (3 s) has the backend write it back **only if it is still owned, and still missing
or changed, and still this registry's**: etcd reads the key (linearizable: a transaction with a
put is a Raft proposal even when its compare fails), then writes it in one transaction
comparing its mod revision with the one read (0: missing), unless it is on another lease than
ours (a successor's adoption: not ours to undo; one written with no lease, by hand, even the
same value, is taken back: a watch tells the registry of such a put); ZooKeeper reads the node
(a failed create is a write too), creates a deleted one in one transaction with a check that
its index node is still there (both created if that is gone too), sets a changed one with the
version read, takes one of no session over (not with Nerve's layout), and leaves one another
session holds. What is written is :func:`restamped`. An agent's own writes never trigger this:
the registry records an instance as owned before writing it, and the write-back writes what is
owned when it runs (an older value of ours seen late costs a read); a key whose last write lost
its answer is *unsettled* (the registry may hold that write) and left to the agent until a
write of it succeeds. An entry put back meanwhile (the agent's reconcile) is not written twice:
each write reaches every host of the fleet. What the lease's keeper (etcd: a lease gone, or
instances still to write again) or the session's recovery (ZooKeeper: an entry not yet written
in this session) puts back is left to them. A write-back whose answer was lost may still land,
after the entry's own deregister too: its key is looked at again ``recheck`` s later (twice the
registry's timeout), when etcd deletes it if it is no longer owned but there on the registry's
lease (one session's ZooKeeper requests apply in order, so there it cannot land late). The
other keys waiting then wait for the registry (half ``recheck``, doubling while it does not
answer: down, or busy, as an ensemble reading a fleet's write-backs; they used to be left to
the agent's reconcile, up to 33 s later), and are left to the reconcile only once that wait
reaches four ``recheck``. The wait spreads a fleet whose entries went at once over that
window.

It costs nothing in the steady state: it rides on the watches the host has anyway
(``discovery up``: the agent and the watcher share one registry client). The owned entries no
running watch follows (``discovery agent`` alone; a router following k services: its own
instances of the others) are followed by watches of those keys alone (:attr:`Restorer.own`:
:mod:`~discovery.registry.zk_own`, :mod:`~discovery.registry.etcd_own`), so such a host costs
the registry what its own instances do, not what their services do fleet-wide (the URL's
``own=``: ``keys``, the default; etcd's ``services`` watches their services instead, which
``etcd grpc-proxy`` coalesces; ``off``, none: the agent's reconcile alone); what those
miss (an etcd key's first ~0.5 s, a ZooKeeper node whose recovery is refused) is the agent's
next reconcile's. After a lost link they come back later than the host's other watches
(:data:`OWN_LATER`), so that a fleet's restart does not bring them back all at once.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, Protocol

from discovery.errors import RegistryError, RegistryUnavailable
from discovery.model import Instance
from discovery.model.instance import stamp_after
from discovery.registry.base import Change, ChangeCallback, Snapshot
from discovery.registry.readback import ReadBack, Wire
from discovery.retry import RetryAt, spread

log = logging.getLogger(__name__)
Key = tuple[str, str]
#: keys written back together at most (``Restorer``'s ``many``)
MANY = 100
#: after a lost link, the watches of a host's own keys (:attr:`Restorer.own`) come back at a
#: random moment within these many resume spreads (``spread=``; 9 to 60 s at 3 s): after the
#: fleet's other resumes, which come within one spread, and thinly (etcd: one watcher a key)
OWN_LATER = (3.0, 20.0)


class OwnWatch(Protocol):
    """Watches of some of a registry's own keys, whose events go to the write-back."""

    @property
    def keys(self) -> set[Key]: ...

    def only(self, keys: Collection[Key]) -> None: ...

    def close(self) -> None: ...


class Restorer:
    """The keys of owned entries seen deleted or changed, each handed to ``restore(key,
    doubt)`` (a conditional write; it returns what it did: ``"deleted"``, ``"changed"``, or
    ``""`` for nothing; the value it writes is :func:`restamped`) after a random wait
    within ``window`` s; one thread, started at the first key. ``owned``: the registry's owned
    entries, by key; ``wire``: an instance as a reader gets it back from the layout (None: as
    it is). A write-back whose answer was
    lost (:class:`~discovery.errors.RegistryUnavailable`) may still land, maybe after the
    entry's own deregister: its key is handed over once more ``recheck`` s later with
    ``doubt`` (the backend then deletes it if it is no longer owned but there as ours). The
    other keys waiting then wait too (each would wait for the registry under the
    registry's lock): half ``recheck``, doubling while the registry stays so; once that wait
    reaches four ``recheck`` they are left to the agent's reconcile. ``many`` (ZooKeeper,
    whose late answers cannot land after a deregister): the keys due at one moment written in
    one call, up to :data:`MANY`; a call the registry did not answer: they wait as the
    others."""

    def __init__(self, owned: dict[Key, Instance], restore: Callable[[Key, bool], str],
                 window: float, name: str, recheck: float = 10.0,
                 wire: Wire | None = None,
                 many: Callable[[list[Key]], dict[Key, str]] | None = None) -> None:
        self._owned, self._restore, self._window, self._name = owned, restore, window, name
        self._recheck, self._many = recheck, many
        self._read_back = ReadBack(wire, lambda: self._owned)  # (wire: None, as it is)
        #: keys whose last write lost its answer (:func:`claiming`):
        #: what the registry holds may be that write; left to the agent until one succeeds
        self.unsettled: set[Key] = set()
        self._cond = threading.Condition()
        self._due: dict[Key, tuple[float, bool, bool]] = {}  # key -> (when, doubt, gone)
        self._heap: list[tuple[float, Key]] = []  # stale entries skipped
        self._thread: threading.Thread | None = None
        self._closed = False
        self.restored = 0  # entries written back (the others were there again, or not ours)
        self._unavailable = RetryAt(recheck / 2, 4 * recheck)  # the others' wait (see above)
        self._follows: list[tuple[frozenset[str] | None, threading.Event]] = []  # watches

        #: the registry's watches of its own keys (:mod:`~discovery.registry.zk_own`,
        #: :mod:`~discovery.registry.etcd_own`): for those no running watch follows
        self.own: OwnWatch | None = None
        self._own_lock = threading.Lock()

    def followed(self, services: Collection[str] | None, stopped: threading.Event) -> None:
        """A watch of ``services`` (None: all) runs until ``stopped`` is set."""
        scope = None if services is None else frozenset(services)
        self._follows = [*(f for f in self._follows if not f[1].is_set()), (scope, stopped)]
        self.watch_own()

    def follows(self, service: str) -> bool:
        """Whether a running watch sees ``service``'s owned entries."""
        return any(not stopped.is_set() and (scope is None or service in scope)
                   for scope, stopped in self._follows)

    def watch_own(self) -> None:
        """:attr:`own` watches the owned keys no running watch follows, and no others: after a
        register, a deregister, a watch started, a reconcile's read (a watch stopped)."""
        if self.own is not None:
            with self._own_lock:  # one at a time: a stale list never applied last
                self.own.only([key for key in self._copy() if not self.follows(key[0])])

    def wrap(self, callback: ChangeCallback,
             services: Collection[str] | None = None) -> ChangeCallback:
        """``callback`` for a watch (of ``services``, None: all), telling this of what it sees."""
        scope = None if services is None else frozenset(services)

        def seen(change: Change) -> None:
            try:
                if not self._owned:  # a watch-only registry: nothing to look at, no copy
                    pass
                elif change.kind == "delete":
                    self.lost([change.key])
                elif change.kind == "put":
                    owned = self._owned.get(change.key)  # (one lookup: atomic, no lock)
                    if (owned is not None and change.instance is not None
                            and change.key not in self.unsettled
                            and (change.unowned or not self.same(owned, change.instance))):
                        self._schedule([change.key], gone=False)
                elif change.kind == "reset" and (snap := change.snapshot) is not None:
                    self._reset(snap, scope)
            finally:
                callback(change)

        return seen

    def _reset(self, snap: Snapshot, scope: frozenset[str] | None) -> None:
        """The owned entries in ``scope`` that ``snap`` lacks, and those it holds changed (or
        written with no lease or session: ``Snapshot.unowned``, a node's read)."""
        gone: list[Key] = []
        changed: list[Key] = []
        for key, owned in self._copy().items():
            if (scope is not None and key[0] not in scope) or snap.keeps(key):
                continue
            seen = snap.instances.get(key)
            if seen is None:
                gone.append(key)
            elif key not in self.unsettled and (key in snap.unowned
                                                 or not self.same(owned, seen)):
                changed.append(key)
        self._schedule(gone)
        self._schedule(changed, gone=False)

    def same(self, owned: Instance, seen: Instance) -> bool:
        """Whether ``seen`` (read from the registry) is ``owned`` as this registry wrote it:
        equal apart from write stamps (``registered_at``, ``written_at``, ``seen_at``), once
        through the layout (Nerve's record carries less than an instance). A value read that
        is not one written here is another writer's; comparing as written keeps a host from
        writing its own value again and again."""
        return self._read_back.same(owned, seen)

    def as_written(self, key: Key, seen: Instance) -> bool:
        """Whether ``seen`` is the registry's own ``key``, settled, :meth:`same` as written."""
        owned = None if key in self.unsettled else self._owned.get(key)  # (atomic lookups)
        return owned is not None and self.same(owned, seen)

    def lost(self, keys: Collection[Key]) -> None:
        """From any thread: ``keys`` were seen gone; those the registry owns are looked at
        after their wait (a key waiting already keeps its turn)."""
        self._schedule([k for k in keys if k in self._owned])  # (one lookup: atomic, no lock)

    def _schedule(self, keys: Collection[Key], doubt: bool = False, gone: bool = True) -> None:
        """Each of ``keys`` after a random wait within the window; with ``doubt``, after the
        recheck's wait (replacing a turn it had). ``gone``: seen deleted, else changed (a key
        waiting keeps its turn and takes the latest)."""
        if not keys:
            return
        with self._cond:
            if self._closed:
                return
            for key in keys:
                if (turn := self._due.get(key)) is not None and not doubt:
                    self._due[key] = (turn[0], turn[1], gone)
                else:
                    due = time.monotonic() + (self._recheck if doubt else spread(self._window))
                    self._due[key] = (due, doubt, gone)
                    heapq.heappush(self._heap, (due, key))
            if self._thread is None:
                thread = threading.Thread(target=self._run, daemon=True,
                                          name=f"{self._name}-restore")
                thread.start()
                self._thread = thread
            self._cond.notify()

    def _copy(self) -> dict[Key, Instance]:
        """The owned entries now, without the registry's lock: a watch delivers on a thread
        that must never wait for it (etcd's: the loop, on which that lock's holder may be
        waiting for a call). The registry changes them under that lock; one ``dict.copy()``
        is atomic under the GIL."""
        return self._owned.copy()

    def close(self) -> None:
        if self.own is not None:
            self.own.close()
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _next(self) -> tuple[Key, bool, bool] | None:
        """The next key whose time has come, its doubt and whether it was seen gone (waiting
        for it), None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    due, key = heapq.heappop(self._heap)
                    if self._due.get(key, (None, False))[0] != due:
                        continue  # a later turn of the same key replaced this one
                    _, doubt, gone = self._due.pop(key)
                    return key, doubt, gone
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _postpone(self) -> str:
        """The registry did not answer a write-back (down, or too busy: an ensemble reading a
        fleet's write-backs): the keys waiting wait for it (the doubted keep their turn), or,
        once it has failed for that long, are left to the agent's reconcile."""
        wait = self._unavailable.failed(jitter=0.25)
        with self._cond:
            waiting = [(k, v) for k, v in self._due.items() if not v[1]]
            if self._unavailable.wait >= self._unavailable.maximum:  # the reconcile's
                self._due = {k: v for k, v in self._due.items() if v[1]}
                return f"{len(waiting)} more left to the agent's reconcile"
            later = time.monotonic() + wait
            for key, (due, doubt, gone) in waiting:
                if due < later:
                    self._due[key] = (when := later + spread(self._window), doubt, gone)
                    heapq.heappush(self._heap, (when, key))
        return f"{len(waiting)} more in {wait:.1f} s or later"

    def _also(self) -> list[tuple[Key, bool]]:
        """With ``many``: the other keys due now and not in doubt (and whether each was seen
        gone), taken to be written together with the one whose turn it is (keys fall due
        together when the registry is slow: each waited its round trips behind the last)."""
        if self._many is None:
            return []
        now = time.monotonic()
        with self._cond:
            due = [(k, v[2]) for k, v in self._due.items() if v[0] <= now and not v[1]]
            del due[MANY - 1:]
            for key, _ in due:
                del self._due[key]  # (its heap entry: stale)
        return due

    def _run(self) -> None:
        while (turn := self._next()) is not None:
            key, doubt, gone = turn
            turns = {k: g for k, g in [(key, gone), *([] if doubt else self._also())]
                     if k not in self.unsettled}  # a write of ours may be there: the agent's
            if not turns:  # (the backend looks again under its lock, which a write that
                continue  # marks it holds)
            keys = list(turns)
            key, gone = keys[0], turns[keys[0]]
            try:
                done = (self._many(keys) if len(keys) > 1 and self._many is not None
                        else {key: self._restore(key, doubt)})
                for written, what in done.items():
                    if what:
                        self.restored += 1
                        log.warning("%s/%s of this node was %s in the registry by another "
                                    "writer; written back", *written, what)
                if done:  # (the registry was asked)
                    self._unavailable.succeeded()
            except RegistryUnavailable as exc:
                if self._closed:
                    return
                if len(keys) > 1:  # ``many``'s (ZooKeeper: one session's requests apply in
                    with self._cond:  # order, no answer lands late): they wait as the others
                        self._due.update({k: (0.0, False, g) for k, g in turns.items()
                                          if k not in self._due})  # (a newer turn: kept)
                log.warning("writing back %s/%s%s, %s by another writer: %s; %s", *key,
                            _and_more(len(keys) - 1), _what(gone), exc, self._postpone())
                if not doubt and len(keys) == 1:
                    self._schedule([key], doubt=True, gone=gone)
            except RegistryError as exc:  # the agent's next reconcile writes it
                if not self._closed:
                    log.warning("writing back %s/%s%s, %s by another writer: %s", *key,
                                _and_more(len(keys) - 1), _what(gone), exc)
            except Exception:
                log.exception("writing back %s/%s%s failed", *key, _and_more(len(keys) - 1))


@contextmanager
def claiming(owned: dict[tuple[str, str], Instance], lock: AbstractContextManager[Any],
             instance: Instance, unsettled: set[tuple[str, str]]) -> Iterator[None]:
    """Record ``instance`` as owned for the duration of a write; undo if the write fails. A
    write whose answer was lost (:class:`RegistryUnavailable`) may have landed: its key is
    ``unsettled`` until a write of it succeeds, and is not written back meanwhile (a watch
    that saw it land would take it for another writer's value and write the one before over
    it: :mod:`~discovery.registry.owned`); the agent writes it again, or its reconcile does."""
    key = instance.key
    with lock:
        previous = owned.get(key)
        owned[key] = instance
    try:
        yield
    except BaseException as exc:
        with lock:
            if owned.get(key) is instance:
                if previous is None:
                    del owned[key]
                else:
                    owned[key] = previous
            if isinstance(exc, RegistryUnavailable):
                unsettled.add(key)
        raise
    with lock:
        unsettled.discard(key)


def unread(_change: Change) -> None:
    """The callback of a watch only the write-back reads (own-key watches)."""


def _what(gone: bool) -> str:
    return "deleted" if gone else "changed"


def _and_more(more: int) -> str:
    return f" and {more} more" if more else ""


def restamped(inst: Instance) -> Instance:
    """``inst`` as a write-back writes it: stamped now (:func:`~discovery.model.instance.
    stamp_after` the stamp it had; ``seen_at``: the change seen now)."""
    now = time.time()
    return replace(inst, written_at=stamp_after(inst.written_at, now), seen_at=now)
