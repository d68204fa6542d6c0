"""What a ZooKeeper follower's worker has yet to read or deliver, handed over by other threads.

:class:`~discovery.registry.zk_watch.ZkWatch` reads a node again at each of its events. Two
things travel with those reads from kazoo's threads to the watch's worker:

- the answers to the reads kazoo's connection thread sent itself
  (:class:`~discovery.registry.zk_io.PreReads`), every one in order: a drain's ``draining``
  record and then its delete are two answers, and the worker delivers both;
- which nodes' *data* changed (an event of type ``CHANGED``, not a create or a delete) since
  the worker last read them. ZooKeeper's events carry no data, so when the agent writes
  ``draining`` and deletes at once, the read made for the change may find the node gone. Such
  a delete is taken for the agent's departure
  (:attr:`~discovery.registry.base.Change.drained`), which the wipe guard never holds, not
  for a bare delete, which a registry-side wipe makes (a session expiry, a deleted prefix:
  no data change before). An inference, not a record: a node whose data changed (new tags,
  maintenance) and that a wipe deleted before the read reads as a departure too; a departure
  told only by a reconnect's catch-up (``SetWatches``: "deleted") reads as a bare delete.

It also tells which nodes of a directory have an answer that found them there, not handed on
yet (:meth:`Pending.found_under`): a Nerve reporter's new node, read before its old one's
delete was (:func:`~discovery.registry.zk_scan.other_holders`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple


class Answer(NamedTuple):
    """An answer to a node's read: its ``(data, stat)`` (None: gone), the zxid then, the
    watch's full reads then (an answer to a read before the last full one is stale), whether
    the read was for a change of its data, and whether for a live event of a persistent watch
    (not a reconnect's catch-up: the events then come before what the outage changed)."""

    read: Any
    zxid: int
    gen: int
    changed: bool
    live: bool = False


class Pending:
    """One lock; kazoo's threads add, the worker takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, list[Answer]] = {}
        self._touched: set[str] = set()
        self._found: dict[str, set[str]] = {}  # directory -> nodes answered there, not taken

    def touch(self, path: str, changed: bool = True) -> None:
        """The worker reads ``path`` again; ``changed``: for a change of its data."""
        if changed:
            with self._lock:
                self._touched.add(path)

    def untouch(self, path: str) -> bool:
        """Before the worker reads ``path``: whether that read answers a change of its data."""
        with self._lock:
            touched = path in self._touched
            self._touched.discard(path)
            return touched

    def answered(self, path: str, answer: Answer) -> None:
        with self._lock:
            self._answers.setdefault(path, []).append(answer)
            if answer.read is not None:
                self._found.setdefault(path.rpartition("/")[0], set()).add(path)

    def found_under(self, folder: str) -> list[str]:
        """The nodes of ``folder`` with an answer that found them, not handed on yet."""
        with self._lock:
            return sorted(self._found.get(folder, ()))

    def deliver(self, path: str, one: Callable[[Answer], None]) -> None:
        """Hand ``path``'s answers to ``one``, oldest first; when it raises (the connection
        lost), that answer and those after it stay for the next time."""
        with self._lock:
            answers = self._answers.pop(path, [])
            folder = path.rpartition("/")[0]
            if (found := self._found.get(folder)) is not None:
                found.discard(path)
                if not found:
                    del self._found[folder]
        for n, answer in enumerate(answers):
            try:
                one(answer)
            except BaseException:
                with self._lock:
                    self._answers[path] = answers[n:] + self._answers.get(path, [])
                    if any(a.read is not None for a in self._answers[path]):
                        self._found.setdefault(folder, set()).add(path)
                raise

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self._touched.clear()
            self._found.clear()
