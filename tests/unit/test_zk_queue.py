"""A ZooKeeper follower's work queue (``zk_queue.WorkQueue``): an item still queued is not
queued twice, told without walking the queue (kazoo's connection thread pushes under the lock
the worker takes items with: a mass delete's pushes were quadratic)."""

from __future__ import annotations

from typing import Any

from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType

from discovery.registry.zk_queue import WorkQueue
from tests.harness.util import wait_for
from tests.unit.test_zk_reconnects import ROOT, Client, watch_of


class Counted(str):
    """A path that counts the comparisons made with it (a walk of the queue compares each)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        Counted.compared += 1
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


class Gone(Client):
    def get(self, path: str, watch: Any = None) -> Any:
        raise NoNodeError()


def test_a_mass_delete_is_queued_without_walking_the_queue() -> None:
    watch = watch_of(Gone())
    n = 3_000
    paths = [Counted(f"{ROOT}/web/n{i}:c{i}:80") for i in range(n)]
    try:
        Counted.compared = 0
        with watch._cond:  # the worker takes nothing meanwhile: all n are queued at once
            for path in paths:
                watch._event(path, EventType.DELETED)  # (kazoo's connection thread)
            for path in paths[:100]:  # again, before the worker read them: not queued twice
                watch._event(path, EventType.DELETED)
            assert len(watch._queue) == n
        assert Counted.compared < n, Counted.compared  # a walk: ~n * n / 2 (4.5 million)
        wait_for(lambda: not watch._queue, 10, message="the worker took every item")
    finally:
        watch.stop()


def test_pushed_once_while_queued_taken_in_order_and_counted_right() -> None:
    queue = WorkQueue()
    assert queue.push(("node", "/a")) and queue.push(("read", "/a"))
    assert not queue.push(("node", "/a"))  # still queued
    assert queue.push(("node", "/b")) and queue.push(("reset", ""))
    assert queue.take(most=1) == [("node", "/a")]
    assert ("node", "/a") not in queue and queue.push(("node", "/a"))  # taken: queued again
    assert queue.take() == [("read", "/a")]
    assert queue.take() == [("node", "/b")]  # the reset behind it is not a node
    assert queue.take() == [("reset", "")]
    assert queue.take() == [("node", "/a")] and not queue


def test_the_nodes_behind_a_node_are_taken_together() -> None:
    queue = WorkQueue()
    for item in [("node", "/a"), ("node", "/b"), ("read", "/c"), ("node", "/d")]:
        queue.push(item)
    assert queue.take() == [("node", "/a"), ("node", "/b")]
    assert queue.take() == [("read", "/c")]
    assert queue.take() == [("node", "/d")]


def test_at_most_most_nodes_are_taken_together() -> None:
    queue = WorkQueue()
    for n in range(5):
        queue.push(("node", f"/{n}"))
    assert queue.take(most=2) == [("node", "/0"), ("node", "/1")]
    assert queue.take(most=2) == [("node", "/2"), ("node", "/3")]
    assert queue.take(most=2) == [("node", "/4")] and not queue


def test_failed_items_go_back_first_and_a_copy_queued_meanwhile_stays() -> None:
    queue = WorkQueue()
    for item in [("node", "/a"), ("node", "/b"), ("reset", "")]:
        queue.push(item)
    taken = queue.take()
    queue.push(("node", "/a"))  # its event again while the worker read it
    queue.requeue(taken)  # the read failed
    assert len(queue) == 4
    assert queue.take(most=1) == [("node", "/a")]
    assert ("node", "/a") in queue  # the copy queued meanwhile
    assert [queue.take(most=1)[0] for _ in range(3)] == [("node", "/b"), ("reset", ""),
                                                   ("node", "/a")]
    assert ("node", "/a") not in queue and not queue
    queue.requeue([("node", "/a")])
    queue.clear()
    assert not queue and ("node", "/a") not in queue and queue.push(("node", "/a"))


def test_the_queue_tells_whether_it_holds_anything_but_reads() -> None:
    queue = WorkQueue()
    assert queue.reads_only()
    queue.push(("read", "/a"))
    assert queue.reads_only()
    queue.push(("svc", "web"))
    assert not queue.reads_only()
    taken = queue.take()
    queue.requeue(taken)  # (a read failed: back first)
    assert not queue.reads_only()
    assert queue.take() == [("read", "/a")] and queue.take() == [("svc", "web")]
    assert queue.reads_only()
    queue.push(("node", "/b"))
    queue.clear()
    assert queue.reads_only()
