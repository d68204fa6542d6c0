"""The work queue of a ZooKeeper follower's worker (:class:`~discovery.registry.zk_watch.
ZkWatch`): what to read or deliver next, as ``(kind, argument)`` items.

kazoo's connection thread pushes an item for each watch event, under the lock the worker takes
its items with; an item still queued is not queued twice. Whether it is queued is one look in
a dict of counts kept beside the deque, not a walk of the deque: in a mass delete (a dead
rack's nodes, a wipe) that walk made the pushes quadratic: 30,000 deleted nodes' answers held
kazoo's connection thread 8.6 s in all, the worker waiting for the lock; now 0.9 s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

Item = tuple[str, str]
#: the most ``"node"`` items a follower on one-shot watches takes together (read one request
#: each, then handled: a Nerve burst's deletes share one listing of their directory,
#: ``zk_scan.other_holders``); one on persistent watches takes them all (one ``multiRead``)
ONE_SHOT_BATCH = 200


class WorkQueue:
    """Items in order, each at most once from :meth:`push`. Not thread-safe: its owner's lock
    guards it."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._count: dict[Item, int] = {}  # how many times each item is in _items
        self._others = 0  # how many items of theirs are not "read"s (answers to hand on)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._count

    def reads_only(self) -> bool:
        """Nothing queued but answers to hand on: no listing, no node to read (a relist after
        a reconnect, an event's read lost with the connection)."""
        return not self._others

    def push(self, item: Item) -> bool:
        """Queue ``item`` last, unless it is queued already; whether it was queued now."""
        if item in self._count:
            return False
        self._items.append(item)
        self._count[item] = 1
        self._others += item[0] != "read"
        return True

    def requeue(self, items: Iterable[Item]) -> None:
        """Put ``items`` (taken, then failed) back first, in their order, even those queued
        again meanwhile (then twice: as before)."""
        items = list(items)
        self._items.extendleft(reversed(items))
        for item in items:
            self._count[item] = self._count.get(item, 0) + 1
            self._others += item[0] != "read"

    def take(self, most: int | None = None) -> list[Item]:
        """The first item (there must be one); when it is a ``"node"``, the ``"node"`` items
        right behind it too (read together), ``most`` items in all at most."""
        items = [self._pop()]
        while (items[0][0] == "node" and self._items and self._items[0][0] == "node"
               and (most is None or len(items) < most)):
            items.append(self._pop())
        return items

    def _pop(self) -> Item:
        item = self._items.popleft()
        self._others -= item[0] != "read"
        left = self._count[item] - 1
        if left:
            self._count[item] = left
        else:
            del self._count[item]
        return item

    def clear(self) -> None:
        self._items.clear()
        self._count.clear()
        self._others = 0
