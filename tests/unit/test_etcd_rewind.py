"""``etcd_rewind.checked``: a linearizable read answered behind what a watch had seen before it
tells that watch (etcd went back in time); one answered at or past it tells no one, unless it
came from another cluster or at a lower raft term, or a member's ``Status`` came at a lower
raft index (:class:`ClusterSeen`: a restored cluster whose revision has passed the watch's
already)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from discovery.registry.etcd_rewind import ClusterSeen, checked, status_checked
from discovery.registry.etcd_watch import EtcdWatch


class FakeWatch:
    def __init__(self, seen: int) -> None:
        self.seen = seen
        self.told: list[tuple[int, str]] = []

    def rewound(self, revision: int, why: str = "") -> None:
        self.told.append((revision, why))


def watches(*seen: int) -> list[EtcdWatch]:
    return cast("list[EtcdWatch]", [FakeWatch(s) for s in seen])


def told(ws: list[EtcdWatch]) -> list[list[tuple[int, str]]]:
    return [cast("FakeWatch", w).told for w in ws]


def header(revision: int, cluster: int = 0xC1, term: int = 3) -> Any:
    return SimpleNamespace(revision=revision, cluster_id=cluster, raft_term=term)


def test_only_the_watches_ahead_of_the_answer_are_told() -> None:
    ws = watches(3, 7, 9)
    assert checked(ws, lambda: header(7), lambda h: h).revision == 7
    assert told(ws) == [[], [], [(7, "")]]


def test_what_a_watch_sees_during_the_read_does_not_count() -> None:
    """The read started before the watch saw revision 12: an answer at 10 is not behind."""
    [w] = ws = watches(8)

    def read() -> Any:
        cast("FakeWatch", w).seen = 12  # an event arrives while the read is in flight
        return header(10)

    assert checked(ws, read, lambda h: h).revision == 10
    assert told(ws) == [[]]


def test_no_watch_no_check() -> None:
    assert checked([], lambda: header(5), lambda h: h).revision == 5


def test_a_lower_raft_term_tells_every_watch_whatever_the_revision() -> None:
    """Restored under the same token: the same cluster id, its term back to 2, and its
    revision already past what the watches had seen (writes since the restore)."""
    cluster, ws = ClusterSeen(), watches(8, 20)
    checked(ws, lambda: header(20, term=5), lambda h: h, cluster)
    checked(ws, lambda: header(21, term=5), lambda h: h, cluster)
    assert told(ws) == [[], []]  # the same cluster, the same term: nothing
    checked(ws, lambda: header(30, term=2), lambda h: h, cluster)
    [[(rev, why)], [(rev2, _)]] = told(ws)
    assert rev == rev2 == 30 and "raft term 2, below the 5 seen here" in why
    checked(ws, lambda: header(31, term=2), lambda h: h, cluster)  # the new term: seen now
    checked(ws, lambda: header(32, term=3), lambda h: h, cluster)  # an election: higher
    assert [len(t) for t in told(ws)] == [1, 1]


def test_another_cluster_id_tells_every_watch() -> None:
    cluster, ws = ClusterSeen(), watches(8)
    checked(ws, lambda: header(9, cluster=0xAA, term=7), lambda h: h, cluster)
    checked(ws, lambda: header(40, cluster=0xBB, term=9), lambda h: h, cluster)
    [[(_, why)]] = told(ws)
    assert "etcd cluster bb answered, not aa seen here" in why
    assert (cluster.cluster, cluster.term) == (0xBB, 9)


def test_the_first_answer_is_what_is_seen() -> None:
    cluster = ClusterSeen()
    assert cluster.changed(0xAA, 4) == ""
    assert cluster.changed(0xAA, 9) == "" and cluster.term == 9
    assert cluster.changed(0, 0) == ""  # no header fields (a fake, an old server): no verdict
    assert (cluster.cluster, cluster.term) == (0xAA, 9)


def status(member: int, index: int, revision: int = 50, term: int = 1) -> Any:
    """A member's Status answer: its header (a lagging member's revision and term) and index."""
    return SimpleNamespace(header=SimpleNamespace(revision=revision, cluster_id=0xC1,
                                                  raft_term=term, member_id=member),
                           raftIndex=index)


def test_a_member_at_a_lower_raft_index_tells_every_watch() -> None:
    """Restored under the same token at the first term: only the member's raft log, which
    starts again at one entry a member, has gone back."""
    cluster, ws = ClusterSeen(), watches(8, 20)
    checked(ws, lambda: header(20, term=2), lambda h: h, cluster)
    status_checked(ws, lambda: status(0xA, 640), cluster)
    status_checked(ws, lambda: status(0xB, 600), cluster)  # another member, behind: no verdict
    status_checked(ws, lambda: status(0xA, 650, revision=5, term=1), cluster)  # a lagging
    assert told(ws) == [[], []]  # revision and term of a Status are the member's: not compared
    status_checked(ws, lambda: status(0xA, 44), cluster)
    [[(rev, why)], [_]] = told(ws)
    assert rev == 50 and "etcd member a answered at raft index 44, below the 650 seen" in why
    status_checked(ws, lambda: status(0xB, 45), cluster)  # the new history: seen from now on
    status_checked(ws, lambda: status(0xA, 46), cluster)
    assert [len(t) for t in told(ws)] == [1, 1]
    assert cluster.term == 2  # a Status's term left alone
