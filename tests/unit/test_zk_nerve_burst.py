"""A burst of Nerve departures in one directory (a dead host's nodes gone with its session, a
deploy): a follower finds a restarted reporter's other node by listing the directory
(``zk_scan.other_holders``). The deletes read together share one listing; before, each
listed it: 50 deletes among 100 nodes cost a follower on one-shot watches 51 listings (2,550
entries), and one on persistent watches 50 after a reconnect's catch-up or lost reads, on
every host of the fleet at once. Under persistent watches' live events nothing is listed
(``test_zk_nerve_departures``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kazoo.exceptions import ConnectionLoss, NoAuthError
from kazoo.protocol.states import EventType, KeeperState

from discovery.registry import zk_scan, zk_watch
from discovery.registry.base import FIRST_READ, Change
from discovery.registry.decoder import Decoder
from discovery.registry.zk_watch import ZkWatch
from tests.harness.util import wait_for
from tests.unit.test_zk_nerve_departures import Pre
from tests.unit.test_zk_reconnects import Router
from tests.unit.test_zk_setbacks import URL, WEB, Tree, record

M, N = 100, 50  # nodes in the directory, deleted at once
PATHS = [f"{WEB}/i-{i}_{i:010d}" for i in range(M)]


def key(i: int) -> tuple[str, str]:
    return ("web", f"i-{i}:{8000 + i}")


class Busy(Tree):
    """A busy ensemble (other writers' transactions between any two requests: each answer
    has a newer zxid) whose reads arm one-shot watches, fired as ZooKeeper fires them at a
    delete: the node's data watch, then its directory's child watch. ``entries``: the
    entries of the listings of WEB."""

    def __init__(self) -> None:
        super().__init__({p: record(8000 + i) for i, p in enumerate(PATHS)})
        self.data_watch: dict[str, Any] = {}
        self.child_watch: dict[str, Any] = {}
        self.entries = 0

    def get_children(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        self.last_zxid += 1
        out = super().get_children(path, watch, include_data)
        if path == WEB:
            self.entries += len(out[0] if include_data else out)
        if watch is not None:
            self.child_watch[path] = watch
        return out

    def get(self, path: str, watch: Any = None) -> Any:
        self.last_zxid += 1
        out = super().get(path, watch)
        if watch is not None:
            self.data_watch[path] = watch
        return out

    def each(self, paths: list[str], refused: list[str] | None = None) -> Iterator[Any]:
        self.last_zxid += 1  # one multiRead
        return super().each(paths, refused)

    def create(self, path: str, data: bytes) -> None:
        self.put(path, data)
        self._fire(self.child_watch, WEB, EventType.CHILD)

    def delete(self, path: str) -> None:
        del self.nodes[path]
        self.last_zxid += 1
        self._fire(self.data_watch, path, EventType.DELETED)
        self._fire(self.child_watch, WEB, EventType.CHILD)

    @staticmethod
    def _fire(watches: dict[str, Any], path: str, kind: str) -> None:
        if (fn := watches.pop(path, None)) is not None:
            fn(SimpleNamespace(type=kind, state=KeeperState.CONNECTED, path=path))


def follow(tree: Busy, kind: str) -> tuple[ZkWatch, list[Change]]:
    """A follower on one-shot watches, or on a persistent watch whose events' reads kazoo's
    connection thread answers (``Pre``)."""
    connected = threading.Event()
    connected.set()
    changes: list[Change] = []
    more: dict[str, Any] = {} if kind == "one-shot" else {
        "router": Router(), "many": tree, "pre": Pre(tree)}
    return ZkWatch(tree, Decoder(URL), connected, changes.append, FIRST_READ, **more), changes


def burst(tree: Busy, watch: ZkWatch, kind: str, paths: list[str],
          before: Callable[[], object] = lambda: None) -> None:
    """``paths`` deleted at once (after ``before``), told to ``watch`` as ``kind`` tells: all
    queued before its worker looks (it waits for its lock)."""
    with watch._cond:
        gen = watch._catch_up.begin() if kind == "catch-up" else 0
        before()
        for path in paths:
            if kind == "one-shot":
                tree.delete(path)
                continue
            del tree.nodes[path]
            tree.last_zxid += 1
        for path in paths if kind != "one-shot" else ():
            if kind == "lost reads":  # the event's read lost with the connection: read again
                watch._answered(path, watch._gen, False, True, None, ConnectionLoss(),
                                tree.last_zxid)
            else:
                watch._event(path, EventType.DELETED)
        if gen:
            watch._catch_up._end(gen)


def settle(watch: ZkWatch, changes: list[Change], count: int) -> None:
    wait_for(lambda: len(changes) >= count and not watch._queue, 10, message="handed on")
    watch.stop()  # (joins the worker: nothing is read after this)


@pytest.mark.parametrize(("kind", "most"), [
    ("one-shot", 3),  # the first delete's listing, the child watch's relist, the rest's
    ("live", 0),  # live events: nothing listed (their answers tell), before too
    ("catch-up", 1),  # a reconnect's catch-up: every answer in before the first listing
    ("lost reads", 1),  # read again by the worker, together (one multiRead)
])
def test_a_burst_of_deletes_in_one_directory_shares_one_listing(kind: str, most: int) -> None:
    tree = Busy()
    watch, changes = follow(tree, kind)
    listed, entries = tree.listed.count(WEB), tree.entries  # the first read's
    burst(tree, watch, kind, PATHS[:N])
    settle(watch, changes, 1 + N)
    assert sorted(c.key for c in changes[1:] if c.kind == "delete") == sorted(map(key, range(N)))
    assert [c for c in changes[1:] if c.kind != "delete"] == []
    listed, entries = tree.listed.count(WEB) - listed, tree.entries - entries
    assert listed <= most, listed  # before: 51 one-shot (2,550 entries), 50 caught up or lost
    assert entries <= most * (M - N), entries


def test_a_one_shot_follower_takes_at_most_a_batch_of_nodes_a_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Read one request each, a batch is handled once all are read: a bounded batch (a
    relisted service's new nodes) delivers its first sooner and reads fewer again after a
    failure. Here 10: the first delete alone, the relist, then 49 deletes in 5 batches."""
    monkeypatch.setattr(zk_watch, "ONE_SHOT_BATCH", 10)
    tree = Busy()
    watch, changes = follow(tree, "one-shot")
    listed = tree.listed.count(WEB)
    burst(tree, watch, "one-shot", PATHS[:N])
    settle(watch, changes, 1 + N)
    assert tree.listed.count(WEB) - listed == 1 + 1 + 5


@pytest.mark.parametrize("kind", ["one-shot", "catch-up"])
def test_a_restarted_reporters_node_still_holds_its_instance_in_a_burst(kind: str) -> None:
    """The reporter of the last node deleted restarted just before the burst: its new node,
    never read when the first delete listed the directory, is found by that listing, and the
    instance is not deleted (the later deletes share the listing)."""
    tree = Busy()
    watch, changes = follow(tree, kind)
    last = N - 1
    new = f"{WEB}/i-{last}_{M + 1:010d}"
    burst(tree, watch, kind, PATHS[:N], before=lambda: tree.create(new, record(8000 + last)))
    deletes = sorted(map(key, range(last)))  # never out of routing: key(last)
    wait_for(lambda: sorted(c.key for c in changes if c.kind == "delete") == deletes
             and not watch._queue, 10, message="the burst's deletes")
    settle(watch, changes, N)  # (and the new node's put)
    assert sorted(c.key for c in changes[1:] if c.kind == "delete") == deletes
    assert {c.key for c in changes[1:] if c.kind == "put"} == {key(last)}
    assert tree.listed.count(WEB) <= 4  # the first read's + (one-shot: 3; caught up: 1)


def test_a_departure_after_the_shared_listing_lists_again() -> None:
    """A listing serves only the deletes seen by the zxid it was sent at: a reporter that
    restarts after the burst (its new node made, then its old one deleted) is found by a new
    listing, not taken for gone on the word of the old one."""
    tree = Busy()
    watch, changes = follow(tree, "one-shot")
    try:
        burst(tree, watch, "one-shot", PATHS[:N])
        wait_for(lambda: len(changes) >= 1 + N and not watch._queue, 10, message="the burst")
        new = f"{WEB}/i-{N}_{M + 1:010d}"
        with watch._cond:
            tree.create(new, record(8000 + N))
            tree.delete(PATHS[N])
        wait_for(lambda: any(c.kind == "put" for c in changes) and not watch._queue, 10,
                 message="the new node")
    finally:
        watch.stop()
    assert {(c.kind, c.key) for c in changes[1 + N:]} == {("put", key(N))}  # never deleted


def test_a_burst_in_a_directory_we_may_not_list_is_delivered_with_few_refusals(
        caplog: pytest.LogCaptureFixture) -> None:
    """As ``test_a_nerve_departure_in_a_directory_we_may_not_list_is_delivered_and_named``,
    for a burst: every departure delivered, the directory named, and the refused listing is
    not asked again for each (before: 51 refused listings)."""
    tree = Busy()
    watch, changes = follow(tree, "one-shot")
    listed = tree.listed.count(WEB)
    tree.fail[WEB] = [NoAuthError()] * (N + 1)
    burst(tree, watch, "one-shot", PATHS[:N])
    settle(watch, changes, 1 + N)
    assert sorted(c.key for c in changes[1:] if c.kind == "delete") == sorted(map(key, range(N)))
    assert tree.listed.count(WEB) - listed <= 3
    assert any("NoAuth" in r.getMessage() and WEB in r.getMessage() for r in caplog.records)


def test_a_one_shot_batchs_reads_are_all_sent_before_an_answer_is_waited_for() -> None:
    """A batch of up to ``ONE_SHOT_BATCH`` nodes is one round trip: its first node is not
    delivered a read of every other later (before, a read each, one after the other)."""
    events: list[tuple[str, str]] = []
    answer = (record(8000), SimpleNamespace(mzxid=1, mtime=0, ephemeralOwner=1))

    class Recorder:
        def get_async(self, path: str, watch: Any = None) -> Any:
            events.append(("sent", path))
            return SimpleNamespace(get=lambda: events.append(("waited", path)) or answer)

        def get(self, path: str, watch: Any = None) -> Any:  # what a read each did
            return self.get_async(path, watch).get()

    paths = PATHS[:3]
    read = list(zk_scan.read_nodes(Recorder(), None, Decoder(URL), lambda item: None, paths, []))
    assert [path for path, _ in read] == paths
    assert events == [("sent", p) for p in paths] + [("waited", p) for p in paths]


def test_a_node_listed_but_not_read_still_holds_its_instance_in_a_directory_we_may_not_list(
        ) -> None:
    """A restarted reporter's new node, listed before the directory was locked, its read
    queued behind its old node's delete (the delete's event came while the relist that found
    it was in flight): the refused listing cannot show it, so the nodes already known and not
    read are read. Before, the departure was delivered and the instance left every
    follower's routing until the new node's read put it back."""
    tree = Busy()
    watch, changes = follow(tree, "one-shot")
    new = f"{WEB}/i-0_{M + 1:010d}"
    try:
        with watch._cond:
            tree.put(new, record(8000))  # the reporter of PATHS[0], restarted: listed...
            watch._nodes[new] = 0
            tree.fail[WEB] = [NoAuthError()] * 5  # ...then READ taken off the directory
            tree.delete(PATHS[0])
            watch._push(("node", new))  # (the relist's hand-on, behind the delete)
        wait_for(lambda: any(c.kind == "put" for c in changes) and not watch._queue, 10,
                 message="the new node read")
    finally:
        watch.stop()
    assert {(c.kind, c.key) for c in changes[1:]} == {("put", key(0))}  # never deleted
    assert new in tree.data_watch  # (read with its watch)
