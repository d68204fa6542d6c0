"""A Nerve node's departure under persistent watches (the events of a follower's persistent
watch, read at once by kazoo's connection thread: ``zk_io.PreReads``): a restarted reporter's
new node was created, and its read answered, before the old node's delete was. That answer is
handed on first; the service is not listed. Before, every departure listed the whole service
for every follower (a 2,000-node service: 44 KB a departure, a follower)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from kazoo.exceptions import ConnectionLoss, NoNodeError
from kazoo.protocol.states import EventType

from discovery.registry.base import FIRST_READ, Change
from discovery.registry.decoder import Decoder
from discovery.registry.zk_watch import ZkWatch
from tests.harness.util import wait_for
from tests.unit.test_zk_reconnects import Router
from tests.unit.test_zk_setbacks import NODE, URL, WEB, Tree, record

NEW = f"{WEB}/i-1_0000000002"  # the restarted reporter's node: the same instance


class Pre:
    """``PreReads`` as kazoo's connection thread runs it: each event's read answered in the
    order sent (here at once, on the caller's thread)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def add(self, path: str, answered: Any) -> None:
        try:
            read, error = self.tree.get(path), None
        except NoNodeError as exc:
            read, error = None, exc
        answered(read, error, self.tree.last_zxid)


def follow(tree: Tree) -> tuple[ZkWatch, list[Change]]:
    connected = threading.Event()
    connected.set()
    changes: list[Change] = []
    watch = ZkWatch(tree, Decoder(URL), connected, changes.append, FIRST_READ,
                    router=Router(), many=tree, pre=Pre(tree))  # type: ignore[arg-type]
    return watch, changes


def depart(events: Callable[[Tree, ZkWatch], object], settled: int) -> tuple[list[Change], int]:
    """A follower of NODE; ``events`` happen while its worker waits (under its lock: every
    answer is in before it looks). Once it has handed on ``settled`` changes, its first read's
    included, and its queue is empty: the changes after that read, and how many times it
    listed the service meanwhile."""
    tree = Tree({NODE: record(8080)})
    watch, changes = follow(tree)
    try:
        listed = tree.listed.count(WEB)
        with watch._cond:
            events(tree, watch)
        wait_for(lambda: not watch._queue and len(changes) >= settled, 5, message="handed on")
        return changes[1:], tree.listed.count(WEB) - listed
    finally:
        watch.stop()


def test_a_restarted_reporters_node_answered_first_is_handed_on_not_listed() -> None:
    """The old node's data changed and its answer still waits in the worker's queue; the new
    node is created; the old one deleted: its delete joins the old node's earlier place in the
    queue, ahead of the new node's answer."""
    def events(tree: Tree, watch: ZkWatch) -> None:
        tree.put(NODE, record(8080) + b" ")
        watch._event(NODE, EventType.CHANGED)
        tree.put(NEW, record(8080))
        watch._event(NEW, EventType.CREATED)
        del tree.nodes[NODE]
        watch._event(NODE, EventType.DELETED)
    changes, listed = depart(events, 3)
    assert all(c.kind == "put" for c in changes), changes  # never out of routing
    assert listed == 0  # and the service not listed


def test_a_departure_with_no_new_node_is_a_delete_without_a_listing() -> None:
    def events(tree: Tree, watch: ZkWatch) -> None:
        del tree.nodes[NODE]
        watch._event(NODE, EventType.DELETED)
    changes, listed = depart(events, 2)
    assert [(c.kind, c.key) for c in changes] == [("delete", ("web", "i-1:8080"))]
    assert listed == 0


def test_a_departure_told_by_a_reconnects_catch_up_still_lists() -> None:
    """The link was down: the reporter restarted (its new node made then, no event for it) and
    the old session expired. The old node's delete comes in the catch-up, before its end, and
    nothing of the new node is pending: the service is listed, the new node read."""
    def events(tree: Tree, watch: ZkWatch) -> None:
        tree.put(NEW, record(8080))
        del tree.nodes[NODE]
        gen = watch._catch_up.begin()  # the re-arm: its catch-up's events come first
        watch._event(NODE, EventType.DELETED)
        watch._catch_up._end(gen)  # then its answer (before the worker looks)
    changes, listed = depart(events, 2)
    assert all(c.kind == "put" for c in changes), changes
    assert listed == 1


def test_a_departure_the_worker_reads_itself_still_lists() -> None:
    """A change's read lost with the connection: the worker reads the node itself, later,
    and finds it gone; nothing tells that the new node was made before: listed."""
    def events(tree: Tree, watch: ZkWatch) -> None:
        watch._answered(NODE, watch._gen, True, True, None, ConnectionLoss(), tree.last_zxid)
        tree.put(NEW, record(8080))
        del tree.nodes[NODE]
    changes, listed = depart(events, 2)
    assert all(c.kind == "put" for c in changes), changes
    assert listed == 1


def test_a_live_departure_while_a_relist_is_queued_still_lists() -> None:
    """The reporter restarted while the link was down (its new node: no event); the catch-up
    queued a relist of the service and ended; then the old session expires, a live event. The
    new node is known to no answer yet: while a relist or a node's read is queued, listed."""
    def events(tree: Tree, watch: ZkWatch) -> None:
        gen = watch._catch_up.begin()
        tree.put(NEW, record(8080))
        watch._fired(("svc", "web"), SimpleNamespace(type=EventType.CHILD))
        watch._catch_up._end(gen)
        del tree.nodes[NODE]
        watch._event(NODE, EventType.DELETED)
    changes, _ = depart(events, 2)
    assert all(c.kind == "put" for c in changes), changes
