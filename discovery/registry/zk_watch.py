"""Following a ZooKeeper registry: one worker thread turning watch events into Changes."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any

from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    NoAuthError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, KazooState, KeeperState

from discovery.model.validate import shown
from discovery.registry import zk_scan
from discovery.registry.base import FIRST_READ, Change, ChangeCallback, Snapshot, deliver
from discovery.registry.decoder import Decoder
from discovery.registry.reads import ReadStats
from discovery.registry.zk_io import PreReads
from discovery.registry.zk_multi import ManyReads
from discovery.registry.zk_pending import Answer, Pending
from discovery.registry.zk_persistent import EventRouter
from discovery.registry.zk_queue import ONE_SHOT_BATCH, WorkQueue
from discovery.registry.zk_rewatch import CatchUp, Reconnects, rewatch
from discovery.registry.zk_scan import LivePaths
from discovery.registry.zk_setback import Setbacks, Withheld

log = logging.getLogger(__name__)
_TRANSIENT = (ConnectionLoss, SessionExpiredError, KazooTimeoutError)
#: s before all is read again after a NoAuth: the first, doubling to the last while refused
REFUSED_WAIT = (5.0, 60.0)


class ZkWatch:
    """Follows ``<prefix>/services`` with one worker thread, which emits what changed.

    With the ``router`` of a ZooKeeper 3.6+ client, one persistent recursive watch per
    followed root (:mod:`~discovery.registry.zk_persistent`) tells of each node created,
    changed or deleted; kazoo's connection thread reads that node at once (``pre``:
    :class:`~discovery.registry.zk_io.PreReads`, the nodes of events that came together in one
    ``multiRead``) and queues the answer. Before 3.6, one-shot watches queue "look again at X"
    items, re-armed by the worker's reads. With ``services`` it follows only those services'
    directories. ``reads`` counts what it reads. A lost connection (same session) re-arms the
    watches from the zxid seen before (:mod:`~discovery.registry.zk_rewatch`): only what
    changed meanwhile is read again. A read the ensemble is too busy for is read again, the
    wait doubling; one refused (NoAuth, :data:`REFUSED_WAIT`) or failed otherwise, everything
    (:mod:`~discovery.registry.zk_setback`); a service directory or node refused is left out
    or kept as the full read does, and looked at again (``zk_setback.Withheld``)."""

    def __init__(self, client: Any, decoder: Decoder, connected: threading.Event,
                 callback: ChangeCallback, start_revision: int,
                 services: Collection[str] | None = None, reads: ReadStats | None = None,
                 router: EventRouter | None = None, many: ManyReads | None = None,
                 pre: PreReads | None = None, elsewhere: zk_scan.Known | None = None,
                 own_gone: Callable[[list[tuple[str, str]]], None] | None = None) -> None:
        self._client, self._decoder, self._connected = client, decoder, connected
        self._router, self._many, self._pre, self._own_gone = router, many, pre, own_gone
        self._elsewhere: zk_scan.Known = elsewhere or (lambda _p: None)  # what others read
        self._persistent = router is not None and router.supported is not False
        self._only = None if services is None else frozenset(services)
        self._reads = reads if reads is not None else ReadStats()
        self._url, self._services, self._callback = decoder.url, decoder.url.services_root, callback
        self._cond, self._stopped = threading.Condition(), threading.Event()
        self._queue = WorkQueue()
        self._fns: dict[tuple[str, str], Callable[[Any], None]] = {}
        self._svcs: set[str] = set()
        self._nodes: dict[str, int] = {}  # watched instance path -> mzxid seen
        self._listed: dict[str, int] = {}  # Nerve: zk_scan.other_holders's listings (zxid)
        # path -> the key we emitted a put for (and no delete since). Nerve: several paths
        # may hold one instance (a restarted reporter's old and new node) until one goes.
        self._live, self._known = LivePaths(), LivePaths()  # _known: _live of a failed scan
        self._rearm: set[tuple[str, str]] = set()  # watches kazoo dropped with the connection
        self._pending = Pending()  # _answered's answers; nodes whose data changed
        self._gen = 0  # the full reads (_scan) so far: an answer to a read before is stale
        self._reconnects = Reconnects()  # where we were when the link went
        self._catch_up = CatchUp()  # persistent: later one-shot events are stale
        self._setbacks = Setbacks(REFUSED_WAIT, log)  # the waits after a failed item
        self._withheld = Withheld(REFUSED_WAIT)  # directories the last full read may not list
        self._roots = ([decoder.url.service_dir(s) for s in sorted(self._only)]
                       if self._only is not None else [self._services])
        client.add_listener(self._on_state)
        try:  # read now, so changes right after watch() returns are changes, not the start
            if not connected.is_set():
                raise ConnectionLoss()
            self._init(start_revision)
        except Exception as exc:  # the worker reads it again (and logs a failure there)
            if start_revision == FIRST_READ:  # its reset, or no watch: the caller retries
                self.stop(join=False)
                raise
            log.debug("first read deferred to the worker: %r", exc)
            self._queue.push(("init", str(start_revision)))
        self._thread = threading.Thread(target=self._run, daemon=True, name="zk-watch")
        self._thread.start()

    def _init(self, start_revision: int) -> None:
        """The first read, arming every watch: ``FIRST_READ``'s snapshot; a reset if changed."""
        snap, newest = self._scan()
        if start_revision == FIRST_READ or 0 < start_revision < newest:
            self._deliver(Change("reset", snapshot=snap, revision=snap.revision))

    def _on_state(self, state: str) -> None:
        """kazoo's thread, before it drops the watches: where we were (persistent: re-add)."""
        if state == KazooState.SUSPENDED:
            self._reconnects.dropped(self._client.last_zxid)
        elif state == KazooState.LOST:
            self._reconnects.forget()  # a new session: the registry's recovery resets us
        elif (state == KazooState.CONNECTED and self._persistent
              and self._reconnects.zxid is not None):
            self._push(("rearm", ""))

    def _event(self, path: str, kind: str) -> None:
        """A persistent watch's event (kazoo's connection thread): read that node again, a
        deleted one too, sent from this very thread (:class:`~discovery.registry.zk_io.
        PreReads`); the worker gets the answer. A restarted agent takes its nodes over from
        its old session with a delete and a create in one transaction; only the read tells
        that the node is still there (dropped on the event, it flapped). A node of an entry the
        registry owns goes to its write-back at once (``own_gone``, which reads it first)."""
        if self._stopped.is_set():
            return
        if self._url.split_key(path) is None:
            folder = self._url.split_key(f"{path}/-")  # a service's directory, made or gone:
            if folder is not None:  # its catch-up watch after a cut (zk_rewatch.Reconnects)
                self._reconnects.learned(folder[0], gone=kind == EventType.DELETED)
            return
        if kind == EventType.DELETED and self._own_gone and (key := self._live.get(path)):
            self._own_gone([key])  # (the registry keeps those it owns)
        changed = kind == EventType.CHANGED
        if self._pre is None:
            self._pending.touch(path, changed)
            self._push(("node", path))
        else:
            self._pre.add(path, functools.partial(self._answered, path, self._gen, changed,
                                                  not self._catch_up.open))

    def _answered(self, path: str, gen: int, changed: bool, live: bool, read: Any,
                  error: BaseException | None, zxid: int) -> None:
        """The answer to :meth:`_event`'s read (the connection thread): to the worker."""
        if error is not None and not isinstance(error, NoNodeError):
            self._pending.touch(path, changed and gen == self._gen)  # lost with the
            self._push(("node", path))  # connection: the worker reads it again
            return
        self._pending.answered(path, Answer(read, zxid, gen, changed, live))
        self._push(("read", path))

    def _fired(self, item: tuple[str, str], event: Any) -> None:
        if event.type != EventType.NONE:  # something changed: read it again
            if not self._persistent or self._catch_up.open:
                self._pending.touch(item[1], event.type == EventType.CHANGED
                                    and item[0] == "node")
                self._push(item)
        elif self._persistent:
            pass  # a catch-up watch of the last reconnect: _on_state re-arms everything
        elif event.state == KeeperState.CONNECTING:  # connection lost: re-arm, read nothing
            with self._cond:
                self._rearm.add(item)
            self._push(("rearm", ""))
        # else the session is over: the registry's recovery sends us a reset

    def stop(self, join: bool = True) -> None:
        self._client.remove_listener(self._on_state)
        if self._router is not None:
            for root in self._roots:
                self._router.remove(root, self._event)
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        if join and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self._rearm.clear()  # the scan arms everything anew
            self._pending.clear()
            self._reconnects.forget()
            self._queue.push(("reset", ""))
            self._cond.notify_all()

    def _push(self, item: tuple[str, str]) -> None:
        with self._cond:
            if self._queue.push(item):
                self._cond.notify_all()

    def _fn(self, item: tuple[str, str]) -> Callable[[Any], None]:  # one stable callable per
        fn = self._fns.get(item)  # watched thing (kazoo keeps watchers in a set)
        return fn or self._fns.setdefault(item, lambda event: self._fired(item, event))

    def _w(self, item: tuple[str, str]) -> Callable[[Any], None] | None:  # a read's watch
        return None if self._persistent else self._fn(item)

    def _add_roots(self) -> None:  # (again) before any read: no change falls in between
        if self._persistent and self._router is not None:
            self._persistent = self._router.add_all(self._roots, self._event, timeout=10.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped.is_set():
                    if self._withheld.retry.taken():  # due: also while events keep coming
                        self._queue.push(("withheld", ""))
                    if self._queue:
                        break
                    self._cond.wait(self._withheld.retry.remaining())
                if self._stopped.is_set():
                    return
                items = self._queue.take(None if self._persistent else ONE_SHOT_BATCH)
                item = items[0]
            try:
                if len(items) > 1:
                    self._read_changed([path for _, path in items])
                else:
                    self._handle(item)
                self._setbacks.handled()
            except _TRANSIENT:  # try again once connected (a reset may come first)
                with self._cond:
                    self._queue.requeue(items)
                self._connected.wait(1)
                self._stopped.wait(0.1)
            except ConnectionClosedError:
                return
            except Exception as exc:  # the ensemble's answer: busy, refused, or another
                wait, everything = self._setbacks.after(exc, shown(item[1] or self._services))
                if not everything:  # busy: the same again, later (nothing else read again)
                    with self._cond:
                        self._queue.requeue(items)
                self._stopped.wait(wait)
                if everything:
                    self.reset()

    def _handle(self, item: tuple[str, str]) -> None:
        kind, arg = item
        if kind == "read":
            self._answer(arg)
            return
        if not self._connected.is_set():
            raise ConnectionLoss()
        then: list[tuple[str, str]] = []  # what to look at next
        if kind == "init":
            self._init(int(arg))
        elif kind == "reset":
            snap, _ = self._scan()
            self._deliver(Change("reset", snapshot=snap, revision=snap.revision))
        elif kind in ("services", "svc"):  # one-shot watches: a listing changed
            then = zk_scan.relist(self._client, self._url, self._decoder, self._only,
                                  self._reads, self._svcs, self._nodes, item, self._w(item))
        elif kind == "node":
            self._node(arg)
        elif kind == "rearm":
            self._rewatch()
        elif kind == "withheld":  # a directory readable again: everything; a node: it alone
            then = self._withheld.ready(self._client, self._url)
        for todo in then:
            self._push(todo)

    def _rewatch(self) -> None:
        with self._cond:
            items, self._rearm = self._rearm, set()
        zxid, drops = self._reconnects.begin()
        if self._persistent and zxid is not None:  # everything: persistent + catch-up watches
            keys = (self._url.split_key(path) for path in self._nodes)
            svcs = (self._svcs | self._reconnects.services() | (self._only or set())
                    | {k[0] for k in keys if k})
            items = {("node", path) for path in self._nodes} | {("svc", s) for s in svcs}
            if self._only is None:
                items.add(("services", ""))
        if zxid is None:  # we did not see the connection go: read them again instead
            for item in items:
                self._push(item)
            return
        data = {path: None if self._persistent else self._fn(("node", path))  # None: _event
                for kind, path in items if kind == "node"}  # gets its events and reads it
        child = {self._services if kind == "services" else self._url.service_dir(arg): self._fn(
            (kind, arg)) for kind, arg in items if kind != "node"}
        gen = self._catch_up.begin()  # persistent: its one-shot watches tell only till answered
        try:
            rewatch(self._client, zxid, data, child, timeout=10.0,
                    recursive=self._roots if self._persistent else ())
        except Exception:
            if not self._persistent:  # persistent: the next try re-arms everything anyway
                with self._cond:
                    self._rearm |= items
            raise
        if self._persistent:  # the later events of those one-shot watches are stale
            self._catch_up.answered(self._client, gen)
        with self._cond:
            if not self._rearm and not self._reconnects.done(drops):
                self._push(("rearm", ""))  # the link went again after the answer

    def _answer(self, path: str) -> None:
        """Deliver :meth:`_event`'s answers for ``path`` in order, unless one since is newer."""
        def one(answer: Answer) -> None:
            read, zxid, gen, changed, live = answer
            if gen == self._gen and self._nodes.get(path, 0) <= (
                    zxid if read is None else read[1].mzxid):
                self._changed(path, read, zxid, changed, live)
        self._pending.deliver(path, one)

    def _read_changed(self, paths: list[str]) -> None:  # nodes whose events came together:
        refused: list[str] = []  # one multiRead (persistent watches), else a read each; the
        found, by = dict(self._read_nodes(paths, refused)), self._client.last_zxid  # gone
        for path in paths:  # share a listing (zk_scan.other_holders). Each flag taken after
            changed = self._pending.untouch(path)  # the read: a read that failed keeps it
            if path not in refused or not self._withheld.kept(path, self._live):
                self._changed(path, found.get(path), by, changed)

    def _node(self, path: str) -> None:  # its flag taken after the read (as _read_changed)
        try:
            read = self._client.get(path, watch=self._w(("node", path)))
        except NoNodeError:
            read = None
        except NoAuthError:  # its own ACL denies us READ
            self._decoder.denied(path)
            if self._withheld.kept(path, self._live):
                self._pending.untouch(path)
                return
            read = None
        self._changed(path, read, self._client.last_zxid, self._pending.untouch(path))

    def _changed(self, path: str, read: tuple[bytes, Any] | None, by: int,
                 changed: bool = False, live: bool = False) -> None:
        """Deliver what a read of ``path`` (data and stat; None: gone) by zxid ``by`` changed.
        ``changed``: the read was for a change of its data, so a node gone then was drained."""
        if read is None:
            self._nodes.pop(path, None)
            self._fns.pop(("node", path), None)
            self._gone(path, self._client.last_zxid, by, changed, live)
            return
        data, stat = read
        self._reads.add(path, data)
        if self._nodes.get(path, 0) >= stat.mzxid or self._url.split_key(path) is None:  # older
            return
        seen, self._nodes[path] = self._nodes.get(path, 0), stat.mzxid
        inst = self._decoder.decode(path, data, stat.mtime / 1000)
        if inst is None:  # readers keep its last good value, if any (Snapshot.unreadable):
            return  # one bad write takes no instance out of every host's routing
        if self._live.get(path) not in (None, inst.key):  # a Nerve node now says another port
            try:
                self._gone(path, stat.mzxid, stat.mzxid, live=live)
            except Exception:  # (its Nerve listing) nothing taken: the retry reads it anew
                self._nodes[path] = seen
                raise
        self._live.set(path, inst.key)
        self._reconnects.learned(inst.service)
        self._deliver(Change("put", key=inst.key, instance=inst, revision=stat.mzxid,
                             unowned=not stat.ephemeralOwner))

    def _gone(self, path: str, revision: int, by: int, drained: bool = False,
              live: bool = False) -> None:
        """``path`` lost its instance by zxid ``by``: deleted unless another node holds it."""
        if (key := self._live.get(path)) is None:
            return
        with self._cond:  # a live event's answer, and nothing queued but answers: zk_scan
            quick = ((self._pending.found_under, self._answer)
                     if live and self._queue.reads_only() else None)
        others = zk_scan.other_holders(self._client, self._url, path, key, self._nodes, self._node,
                                       self._live, self._decoder, quick, (self._listed, by))
        self._live.pop(path)
        if not others:
            self._deliver(Change("delete", key=key, revision=revision, drained=drained))
        for other in others:
            self._nodes[other] = 0
            self._push(("node", other))

    def _scan(self) -> tuple[Snapshot, int]:
        """Read everything, arming every watch. Returns the snapshot and the newest zxid seen."""
        self._gen += 1
        self._fns.clear()
        self._reads.full_read()
        self._add_roots()
        self._known = known = self._live or self._known  # what nodes held: until a scan
        self._svcs, self._nodes, self._live = set(), {}, LivePaths()  # succeeds (or others)
        found = zk_scan.scan(self._client, self._url, self._decoder, self._only, self._reads,
                             self._read_nodes, self._w,
                             lambda path: known.get(path) or self._elsewhere(path))
        self._svcs, self._nodes, self._live, self._listed = found.svcs, found.nodes, found.live, {}
        self._known = LivePaths()
        self._setbacks.scanned()  # a refusal from now on waits the first wait again
        self._withheld.scanned(found.snapshot, found.refused)
        self._reconnects.read(found.svcs)  # a directory gone meanwhile is no longer re-armed
        return found.snapshot, found.newest

    def holds(self, path: str) -> tuple[str, str] | None:
        """(Any thread) what ``path`` held when this running watch last read it (Nerve: a new
        watch of the same host keeps a node it cannot read: ``elsewhere``)."""
        return None if self._stopped.is_set() else self._live.get(path) or self._known.get(path)

    def _read_nodes(self, paths: list[str], refused: list[str],
                    ) -> Iterator[tuple[str, tuple[bytes, Any]]]:
        many = self._many if self._persistent else None  # (zk_scan.read_nodes: multiRead)
        return zk_scan.read_nodes(self._client, many, self._decoder, self._w, paths, refused)

    def _deliver(self, change: Change) -> None:
        deliver(self._callback, change, self._stopped)
