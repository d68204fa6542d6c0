"""Re-arming ZooKeeper watches after a lost connection, without reading anything again.

kazoo (2.11) does not do what ZooKeeper's Java client does after a reconnect within the same
session: it drops every watch (each watcher is called once with an event of type NONE) and
sends nothing to re-establish them, so a follower that re-reads what it watched would read
the whole registry again on every blip of its link — every host at once when a ZooKeeper
member restarts. :func:`rewatch` sends ZooKeeper's own ``SetWatches`` request (opcode 101)
instead: the paths we watched and the last zxid we had seen. The server re-arms them and at
once fires a watch event for each node that changed after that zxid (data changed, children
changed, created or deleted) — so only what changed is read again. Persistent recursive
watches (:mod:`~discovery.registry.zk_persistent`) go in the same request, ``SetWatches2``
(opcode 105, ZooKeeper 3.6+), as the Java client sends them. The request is split into parts
of :data:`CHUNK_BYTES` (as the Java client does), far below ``jute.maxbuffer``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kazoo.protocol.serialization import int_struct, long_struct, write_string
from kazoo.protocol.states import Callback

log = logging.getLogger(__name__)

#: paths per SetWatches request: at most this many bytes of them
CHUNK_BYTES = 128 * 1024
Watcher = Callable[[Any], None]


class SetWatches:
    """ZooKeeper's SetWatches request (``relativeZxid``, data, exist and child watches); with
    ``recursive`` paths SetWatches2 (+ persistent, persistent recursive)."""

    def __init__(self, relative_zxid: int, data: Sequence[str], exist: Sequence[str],
                 child: Sequence[str], recursive: Sequence[str] = ()) -> None:
        self.relative_zxid, self.data, self.exist, self.child = relative_zxid, data, exist, child
        self.recursive = recursive
        self.type = 105 if recursive else 101

    def __repr__(self) -> str:
        return (f"SetWatches(zxid={self.relative_zxid:#x}, {len(self.data)} data, "
                f"{len(self.exist)} exist, {len(self.child)} child, "
                f"{len(self.recursive)} persistent recursive)")

    def serialize(self) -> bytearray:
        b = bytearray(long_struct.pack(self.relative_zxid))
        lists = [self.data, self.exist, self.child]
        if self.recursive:
            lists += [(), self.recursive]
        for paths in lists:
            b.extend(int_struct.pack(len(paths)))
            for path in paths:
                b.extend(write_string(path))
        return b

    @classmethod
    def deserialize(cls, _bytes: bytes, _offset: int) -> None:
        return None  # the answer has no body


def _chunks(data: list[str], child: list[str]) -> Iterable[tuple[list[str], list[str]]]:
    part: tuple[list[str], list[str]] = ([], [])
    size = 0
    for i, paths in enumerate((data, child)):
        for path in paths:
            if size + len(path) > CHUNK_BYTES and (part[0] or part[1]):
                yield part
                part, size = ([], []), 0
            part[i].append(path)
            size += len(path) + 4
    if part[0] or part[1]:
        yield part


def rewatch(client: Any, zxid: int, data: dict[str, Watcher | None],
            child: dict[str, Watcher], timeout: float, recursive: Sequence[str] = ()) -> None:
    """Watch again, on ``client``'s current session, the ``data`` paths (their data) and the
    ``child`` paths (their children), each calling its watcher (a data path without one: its
    events go only to the persistent watch above it), and the ``recursive`` paths (persistent
    recursive: their events are routed by zk_persistent); ZooKeeper tells at once of whatever
    changed after ``zxid``. Raises what kazoo raises (e.g. ConnectionLoss)."""
    # First kazoo's side: an event fired right after the request must find its watcher.
    for path, fn in data.items():
        if fn is not None:
            client._data_watchers[path].add(fn)
    for path, fn in child.items():
        client._child_watchers[path].add(fn)
    parts = list(_chunks(sorted(data), sorted(child))) or [([], [])]
    for i, (data_part, child_part) in enumerate(parts):
        result = client.handler.async_result()
        client._call(SetWatches(zxid, data_part, [], child_part,
                                recursive if i == 0 else ()), result)
        result.get(timeout=timeout)
    log.debug("re-armed %d data, %d child and %d persistent watches from zxid %#x", len(data),
              len(child), len(recursive), zxid)


class CatchUp:
    """Whether the catch-up of the latest :func:`rewatch` is still coming in. Its events come
    before the answer; one-shot watches of it that fire later (they stay on the server until
    their node or directory changes) tell, under persistent watches, of a change those told of
    already. :meth:`answered` queues the end on kazoo's event thread, behind the events read
    before the answer; an earlier re-arm's end does not close a later one."""

    def __init__(self) -> None:
        self._state = (0, False)  # (the latest re-arm, its catch-up still open)

    @property
    def open(self) -> bool:
        return self._state[1]

    def begin(self) -> int:
        """Before a re-arm: its number."""
        gen = self._state[0] + 1
        self._state = (gen, True)
        return gen

    def answered(self, client: Any, gen: int) -> None:
        """Re-arm ``gen`` was answered."""
        client.handler.dispatch_callback(Callback("watch", self._end, (gen,)))

    def _end(self, gen: int) -> None:
        if self._state == (gen, True):
            self._state = (gen, False)


class Reconnects:
    """What a follower needs to re-arm its watches after lost connections (thread-safe: kazoo's
    connection thread tells, the worker re-arms):

    - :attr:`zxid`, the last one seen before the first drop not re-armed since (None: nothing
      to re-arm), and the drops counted: a re-arm that a later drop raced (the link went
      again after its answer) is not done;
    - the services learned of (puts, events of service directories; forgotten at the delete
      of the directory), each to get its catch-up watch: a directory made after the full
      read, whose instances were all gone when the link went, would otherwise tell of none
      created meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.zxid: int | None = None
        self._drops = 0
        self._services: set[str] = set()

    def dropped(self, zxid: int) -> None:
        """The connection went (kazoo's SUSPENDED); ``zxid``: the last one seen."""
        with self._lock:
            self._drops += 1
            if self.zxid is None:
                self.zxid = zxid

    def forget(self) -> None:
        """Nothing to re-arm: a new session (everything is read again)."""
        with self._lock:
            self.zxid = None

    def begin(self) -> tuple[int | None, int]:
        """Before a re-arm: the zxid to re-arm from, and the drops so far for :meth:`done`."""
        with self._lock:
            return self.zxid, self._drops

    def done(self, drops: int) -> bool:
        """The re-arm begun at ``drops`` was answered: nothing left to re-arm, unless the link
        went again since (False: its re-arm is still to come)."""
        with self._lock:
            if self._drops != drops:
                return False
            self.zxid = None
            return True

    def learned(self, service: str, gone: bool = False) -> None:
        with self._lock:
            if gone:
                self._services.discard(service)
            else:
                self._services.add(service)

    def services(self) -> set[str]:
        with self._lock:
            return set(self._services)

    def read(self, services: set[str]) -> None:
        """A full read found exactly ``services``: what was learned before it is replaced."""
        with self._lock:
            self._services = set(services)
