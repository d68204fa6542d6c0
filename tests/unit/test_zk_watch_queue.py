"""The ZooKeeper watch's queue of work: a node's read and its deletion replace each other, so
the last event of a node decides what is done with it, whatever was queued before."""

from __future__ import annotations

import threading
from collections import deque

from discovery.registry.zk_watch import ZkWatch


def queue_of(*pushed: tuple[str, str]) -> list[tuple[str, str]]:
    watch = ZkWatch.__new__(ZkWatch)  # the queue alone: no client, no thread
    watch._cond, watch._queue = threading.Condition(), deque()
    for item in pushed:
        watch._push(item)
    return list(watch._queue)


def test_changed_then_deleted_is_dropped_without_a_read() -> None:
    assert queue_of(("node", "/s/a/1"), ("gone", "/s/a/1")) == [("gone", "/s/a/1")]


def test_deleted_then_created_again_is_read() -> None:
    """The creation's read must come last: a deletion left after it would drop a live node."""
    assert queue_of(("node", "/s/a/1"), ("gone", "/s/a/1"), ("node", "/s/a/1")) == [
        ("node", "/s/a/1")]


def test_other_nodes_and_items_keep_their_order_and_are_queued_once() -> None:
    assert queue_of(("node", "/s/a/1"), ("svc", "a"), ("gone", "/s/a/2"), ("node", "/s/a/1"),
                    ("svc", "a"), ("gone", "/s/a/2")) == [
        ("node", "/s/a/1"), ("svc", "a"), ("gone", "/s/a/2")]
