"""A ZooKeeper follower's worker after a failed read (``zk_setback.Setbacks``): an ensemble
that is busy (THROTTLEDOP, a request timed out in it) gets the same read again after a wait
that doubles, jittered, and nothing else is read again; any other failure reads everything
again after such a wait. Before, both waited a fixed 1 s and then read everything again: every
throttled host re-read its whole catalog each second, in step."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from kazoo.exceptions import (
    NoAuthError,
    NoNodeError,
    OperationTimeoutError,
    RequestTimeoutError,
    ThrottledOpError,
)
from kazoo.protocol.states import EventType

from discovery.registry import RegistryURL, zk_watch
from discovery.registry.base import FIRST_READ, Change
from discovery.registry.decoder import Decoder
from discovery.registry.zk_watch import ZkWatch
from tests.harness.util import wait_for
from tests.unit.test_zk_reconnects import Router

URL = RegistryURL.parse("zk://127.0.0.1:2181/nerve?format=nerve&path=/nerve/services/{service}")
WEB = URL.service_dir("web")
NODE = f"{WEB}/i-1_0000000001"


def record(port: int) -> bytes:
    return json.dumps({"host": "127.0.0.1", "port": port, "name": "i-1"}).encode()


class Tree:
    """A kazoo client over a dict of nodes, as far as a watch with a persistent watch reads
    it (``each``: its multiRead); ``fail[path]``: what that path's next reads (or listings)
    raise, in turn."""

    def __init__(self, nodes: dict[str, bytes]) -> None:
        self.nodes, self.mzxid = dict(nodes), dict.fromkeys(nodes, 1)
        self.fail: defaultdict[str, list[Exception]] = defaultdict(list)
        self.listed: list[str] = []
        self.last_zxid = 0x10

    def add_listener(self, fn: Any) -> None:
        pass

    def remove_listener(self, fn: Any) -> None:
        pass

    def _failing(self, path: str) -> None:
        if self.fail[path]:
            raise self.fail[path].pop(0)

    def put(self, path: str, data: bytes) -> None:
        self.last_zxid += 1
        self.nodes[path], self.mzxid[path] = data, self.last_zxid

    def _stat(self, path: str) -> Any:
        return SimpleNamespace(mzxid=self.mzxid[path], mtime=0, ephemeralOwner=1)

    def exists(self, path: str, watch: Any = None) -> Any:
        return SimpleNamespace()

    def get_children(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        self.listed.append(path)
        self._failing(path)
        kids = sorted({p[len(path) + 1:].split("/")[0] for p in self.nodes
                       if p.startswith(f"{path}/")})
        return (kids, SimpleNamespace(pzxid=self.last_zxid)) if include_data else kids

    def get(self, path: str, watch: Any = None) -> Any:
        self._failing(path)
        if path not in self.nodes:
            raise NoNodeError()
        return self.nodes[path], self._stat(path)

    def get_async(self, path: str, watch: Any = None) -> Any:
        """A read sent: answered at once (in the order sent), told by ``get()``."""
        try:
            answer = self.get(path, watch)
        except Exception as exc:  # raised by get(), as kazoo's async result does
            return SimpleNamespace(get=lambda exc=exc: _raise(exc))
        return SimpleNamespace(get=lambda: answer)

    def each(self, paths: list[str], refused: list[str] | None = None) -> Any:
        for path in paths:
            if path in self.nodes:
                yield path, (self.nodes[path], self._stat(path))


def _raise(exc: Exception) -> Any:
    raise exc


class Waits(threading.Event):
    """The worker's stop event: its waits are recorded, not waited."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.waits.append(timeout)
        return self.is_set()


def follow(tree: Tree) -> tuple[ZkWatch, list[Change], Waits]:
    connected = threading.Event()
    connected.set()
    changes: list[Change] = []
    watch = ZkWatch(tree, Decoder(URL), connected, changes.append, FIRST_READ,
                    router=Router(), many=tree)  # type: ignore[arg-type]
    watch._stopped = waits = Waits()
    return watch, changes, waits


def full_reads(tree: Tree) -> int:
    return tree.listed.count(URL.services_root)


@pytest.mark.parametrize("busy", [ThrottledOpError, RequestTimeoutError, OperationTimeoutError])
def test_a_busy_ensemble_gets_the_same_read_again_later_and_nothing_else(busy: type) -> None:
    tree = Tree({NODE: record(8080)})
    watch, changes, waits = follow(tree)
    try:
        assert [c.kind for c in changes] == ["reset"] and full_reads(tree) == 1
        tree.put(NODE, record(8080) + b" ")  # a change of its data, read three times in vain
        tree.fail[NODE] = [busy(), busy(), busy()]
        watch._event(NODE, EventType.CHANGED)
        wait_for(lambda: len(changes) == 2, 5, message="the change, once the ensemble answers")
        assert changes[1].kind == "put" and changes[1].revision == tree.mzxid[NODE]
        assert full_reads(tree) == 1  # before: one a second, everything followed
        first, second, third = waits.waits
        assert 0.5 <= first <= 1.5 and 1.0 <= second <= 3.0 and 2.0 <= third <= 6.0
        assert (first, second, third) != (1.0, 2.0, 4.0)  # jittered: a fleet tries apart
        tree.put(NODE, record(8080))  # it answers: the next busy answer waits 1 s again
        tree.fail[NODE] = [busy()]
        watch._event(NODE, EventType.CHANGED)
        wait_for(lambda: len(changes) == 3, 5, message="the second change")
        assert 0.5 <= waits.waits[3] <= 1.5 and full_reads(tree) == 1
    finally:
        watch.stop()


def test_any_other_failure_reads_everything_again_after_a_doubling_jittered_wait() -> None:
    tree = Tree({NODE: record(8080)})
    watch, changes, waits = follow(tree)
    try:
        tree.fail[NODE] = [RuntimeError("a bug")]
        tree.fail[URL.services_root] = [RuntimeError("still"), RuntimeError("still")]
        watch._event(NODE, EventType.CHANGED)
        wait_for(lambda: len(changes) == 2, 5, message="everything read again")
        assert changes[1].kind == "reset" and full_reads(tree) == 4  # 1 + 2 failed + 1
        first, second, third = waits.waits
        assert 0.5 <= first <= 1.5 and 1.0 <= second <= 3.0 and 2.0 <= third <= 6.0
        assert (first, second, third) != (1.0, 2.0, 4.0)
    finally:
        watch.stop()


def test_a_refused_full_read_is_tried_again_after_5_10_20_s_and_5_once_one_succeeds() -> None:
    """The default ``REFUSED_WAIT`` (5 s doubling to 60, ±10 %): before, a locked services
    directory was read again every 5 s, forever (a fleet's at once). The integration test
    (tests/integration/test_zk_refusals.py) runs the same schedule shortened against a real
    server."""
    tree = Tree({NODE: record(8080)})
    watch, changes, waits = follow(tree)
    try:
        tree.fail[URL.services_root] = [NoAuthError(), NoAuthError(), NoAuthError()]
        watch.reset()  # everything read again (a session expired), the services refused
        wait_for(lambda: len(changes) == 2, 5, message="everything read again")
        assert changes[1].kind == "reset" and full_reads(tree) == 5  # 1 + 3 refused + 1
        assert waits.waits == pytest.approx([5, 10, 20], rel=0.1)
        assert waits.waits != [5.0, 10.0, 20.0]  # jittered: a fleet refused at once reads apart
        tree.fail[URL.services_root] = [NoAuthError()]  # after a full read: 5 s again
        watch.reset()
        wait_for(lambda: len(changes) == 3, 5, message="read once refused again")
        assert waits.waits[3] == pytest.approx(5, rel=0.1) and len(waits.waits) == 4
    finally:
        watch.stop()


def test_a_read_older_than_the_one_delivered_is_not_delivered() -> None:
    """A batch's read of a node, answered before a newer read of it was delivered (a Nerve
    departure's listing reads the directory's unread nodes meanwhile): before, any read other
    than the last delivered one was delivered, an older value over a newer."""
    tree = Tree({NODE: record(8080)})
    watch, changes, _ = follow(tree)
    try:
        wait_for(lambda: len(changes) == 1, 5, message="the first read")
        tree.put(NODE, record(8081))
        watch._event(NODE, EventType.CHANGED)
        wait_for(lambda: len(changes) == 3, 5, message="the new port: a delete and a put")
        older = (record(8080), SimpleNamespace(mzxid=1, mtime=0, ephemeralOwner=1))
        with watch._cond:  # (the worker idle: as if its batch delivered it now)
            watch._changed(NODE, older, tree.last_zxid)
        assert len(changes) == 3, changes[3:]
    finally:
        watch.stop()


@pytest.mark.parametrize("gone", [True, False], ids=["deleted", "another port"])
def test_a_nerve_departure_whose_listing_is_throttled_is_delivered_on_the_retry(
        gone: bool) -> None:
    """A gone Nerve node's instance: the service is listed (a restarted reporter's new node may
    not be read yet); that listing throttled, the retry still deletes the instance (a retry
    that found it taken already delivered nothing: it stayed routed everywhere)."""
    tree = Tree({NODE: record(8080), f"{URL.service_dir('api')}/j-1_0000000001": record(80)})
    watch, changes, waits = follow(tree)
    try:
        if gone:
            del tree.nodes[NODE]
        else:
            tree.put(NODE, record(9090))  # the node now says another port
        tree.fail[WEB] = [ThrottledOpError()]
        watch._event(NODE, EventType.DELETED if gone else EventType.CHANGED)
        wait_for(lambda: len(changes) >= (2 if gone else 3), 5, message="the departure")
        assert [(c.kind, c.key) for c in changes[1:]] == [("delete", ("web", "i-1:8080"))] + (
            [] if gone else [("put", ("web", "i-1:9090"))])
        assert tree.listed.count(WEB) == 3 and full_reads(tree) == 1  # the scan's + 2
        assert len(waits.waits) == 1
    finally:
        watch.stop()


def test_a_nerve_departure_in_a_directory_we_may_not_list_is_delivered_and_named(
        caplog: pytest.LogCaptureFixture) -> None:
    """One ``setAcl`` taking READ off a Nerve service's directory: a departure there (its
    listing looks for a restarted reporter's other node) is delivered at once and the
    directory named; before, every follower waited 5 s, read everything again and kept
    routing the gone instance (the directory then withheld)."""
    api = f"{URL.service_dir('api')}/a-1_0000000001"
    tree = Tree({NODE: record(8080), f"{WEB}/i-2_0000000002": record(8081), api: record(9090)})
    watch, changes, waits = follow(tree)
    try:
        tree.fail[WEB] = [NoAuthError()] * 5
        del tree.nodes[NODE]
        watch._event(NODE, EventType.DELETED)
        wait_for(lambda: len(changes) >= 2, 5, message="the departure")
        assert [(c.kind, c.key) for c in changes[1:]] == [("delete", ("web", "i-1:8080"))]
        assert full_reads(tree) == 1 and not waits.waits
        assert tree.listed.count(WEB) == 2  # the scan's, and the one refused
        assert any("NoAuth" in r.getMessage() and WEB in r.getMessage() for r in caplog.records)
    finally:
        watch.stop()


@pytest.mark.parametrize("then", ["deleted", "unlocked"])
def test_a_kept_node_that_is_freed_is_read_alone_not_everything(
        then: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose own ACL refuses us (a ``setAcl`` on a node of anyone's), kept as last
    read, then deleted (ZooKeeper tells no watch of it) or unlocked after a change: only that
    node is read again. Before, every follower read its whole catalog again, once for each
    such node (2,000 nodes read for one node gone)."""
    monkeypatch.setattr(zk_watch, "REFUSED_WAIT", (0.05, 0.1))
    tree = Tree({NODE: record(8080), f"{WEB}/i-2_0000000002": record(8081)})
    watch, changes, _ = follow(tree)
    try:
        tree.fail[NODE] = [NoAuthError()] * 100  # locked, then changed: the read refused
        tree.put(NODE, record(8080) + b" ")
        watch._event(NODE, EventType.CHANGED)
        wait_for(lambda: NODE in watch._withheld.nodes, 5, message="kept")
        assert [c.kind for c in changes] == ["reset"]  # kept as last read
        tree.fail[NODE] = []
        if then == "deleted":
            del tree.nodes[NODE]
        else:
            tree.put(NODE, record(9090))
        want = [("delete", ("web", "i-1:8080"))] + (
            [("put", ("web", "i-1:9090"))] if then == "unlocked" else [])
        wait_for(lambda: [(c.kind, c.key) for c in changes[1:]] == want, 5,
                 message=f"the node {then}, read alone")
        assert full_reads(tree) == 1 and not watch._withheld.nodes  # the first read's only
    finally:
        watch.stop()
