"""Persistent recursive watches (ZooKeeper 3.6+), which kazoo 2.11 has no API for.

A one-shot watch fires once and must be set again by reading the node again, so a follower
that watches a service directory re-lists the whole directory at every instance that comes
or goes: on a fleet, bytes per change per host grow with the fleet. ``AddWatch`` (opcode 106)
with mode ``PERSISTENT_RECURSIVE`` instead tells of every node created, deleted or changed
below one path, for as long as the connection lasts, and costs the server one watch per
follower instead of one per node it read.

kazoo hands a watch event only to the one-shot watchers registered on that very path and
drops the others, so :class:`EventRouter` reads every event first (it wraps the connection's
event reader) and calls, for an event below a path added with :meth:`EventRouter.add`, that
path's callbacks with the path and the event's type (kazoo's ``EventType``) — on kazoo's
connection thread: they must only queue work.

Persistent watches belong to a connection: after a reconnect they are added again, and the
server sends no catch-up events for them (``zk_watch`` asks ``SetWatches`` for those).
A server older than 3.6 answers ``UNIMPLEMENTED`` and drops the connection; a 3.6+ server
whose watch manager has no persistent watches (``zookeeper.watchManagerName=...
WatchManagerOptimized``, measured on 3.8) answers ``MARSHALLINGERROR`` and keeps it. Either
way :attr:`EventRouter.supported` then says False and the followers use one-shot watches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.exceptions import ConnectionLoss, MarshallingError, UnimplementedError
from kazoo.protocol.serialization import Watch, int_struct, write_string
from kazoo.protocol.states import EVENT_TYPE_MAP, EventType

log = logging.getLogger(__name__)

PERSISTENT_RECURSIVE = 1  # AddWatchMode
ANY_WATCHER = 3  # WatcherType of RemoveWatches
#: a server's answers to ``AddWatch`` when it offers no persistent watches (module docstring)
NOT_OFFERED = (UnimplementedError, MarshallingError)
#: called with the path of a node created, changed or deleted and the event's type (kazoo's
#: ``EventType.CREATED``...), on kazoo's connection thread
EventFn = Callable[[str, str], None]


class _PathRequest:
    """A request of one path and one int whose answer has no body."""

    type = 0

    def __init__(self, path: str, number: int) -> None:
        self.path, self.number = path, number

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.number})"

    def serialize(self) -> bytearray:
        return bytearray(write_string(self.path) + int_struct.pack(self.number))

    @classmethod
    def deserialize(cls, _bytes: bytes, _offset: int) -> None:
        return None


class AddWatch(_PathRequest):
    type = 106


class RemoveWatches(_PathRequest):
    type = 18


class EventRouter:
    """One per kazoo client: routes the events of its persistent recursive watches."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[EventFn, ...]] = {}  # replaced, never changed in place
        #: None until a server answered an AddWatch; False: the ensemble is older than 3.6
        self.supported: bool | None = None
        conn = client._connection
        self._read_event = conn._read_watch_event
        conn._read_watch_event = self._on_event

    def _on_event(self, buffer: bytes, offset: int) -> None:
        try:
            event, _ = Watch.deserialize(buffer, offset)
            path, kind = event.path, EVENT_TYPE_MAP.get(event.type, EventType.NONE)
            for root, fns in self._routes.items():
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    for fn in fns:
                        fn(path, kind)
        except Exception:  # never break kazoo's connection thread
            log.exception("routing a ZooKeeper watch event failed")
        self._read_event(buffer, offset)

    def add(self, root: str, fn: EventFn, timeout: float) -> None:
        """Route the events below ``root`` to ``fn`` and (again) add the server's persistent
        recursive watch there. Raises one of ``NOT_OFFERED`` (no persistent watches on this
        server) or what kazoo raises (ConnectionLoss...)."""
        with self._lock:
            fns = self._routes.get(root, ())
            if fn not in fns:
                self._routes = {**self._routes, root: (*fns, fn)}
        result = self._client.handler.async_result()
        self._client._call(AddWatch(root, PERSISTENT_RECURSIVE), result)
        try:
            result.get(timeout=timeout)
        except NOT_OFFERED as exc:
            if self.supported is None:
                log.warning("this ZooKeeper offers no persistent watches (%s: older than 3.6, "
                            "or a watch manager without them): following with one-shot "
                            "watches", type(exc).__name__)
            self.supported = False
            self.remove(root, fn)
            raise
        self.supported = True

    def add_all(self, roots: Iterable[str], fn: EventFn, timeout: float) -> bool:
        """:meth:`add` of ``fn`` at each of ``roots``: whether the server holds them. False
        when it offers no persistent watches (the caller follows with one-shot ones); a server
        older than 3.6 has dropped the connection then: ConnectionLoss, this once."""
        if self.supported is False:
            return False
        try:
            for root in roots:
                self.add(root, fn, timeout)
        except UnimplementedError:
            raise ConnectionLoss() from None
        except MarshallingError:
            return False
        return True

    def remove(self, root: str, fn: EventFn) -> None:
        """Stop routing to ``fn``; the last one of ``root`` removes the server's watch too
        (not waiting: a watch left behind only sends events no one reads)."""
        with self._lock:
            fns = tuple(f for f in self._routes.get(root, ()) if f != fn)
            routes = {r: f for r, f in self._routes.items() if r != root}
            if fns:
                routes[root] = fns
            self._routes = routes
        if not fns and self.supported:
            self._client._call(RemoveWatches(root, ANY_WATCHER),
                               self._client.handler.async_result())
