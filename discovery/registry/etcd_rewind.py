"""An etcd cluster restored from a backup, told from the answers a host gets anyway.

etcd 3.4 restores a backup's revision: a watch resuming from a later one would wait, silent,
until the restored cluster caught up. :func:`checked` compares a linearizable read's header
(revision, cluster id, raft term) with what each watch had seen before it, and
:func:`status_checked` a member's ``Status`` (cluster id, raft index) with what
:class:`ClusterSeen` had seen; either tells each watch (``EtcdWatch.rewound``) to read
everything again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Rewindable(Protocol):
    """A watch (:class:`~discovery.registry.etcd_watch.EtcdWatch`), as the checks see it."""

    @property
    def seen(self) -> int: ...

    def rewound(self, revision: int, why: str = "") -> None: ...


class ClusterSeen:
    """Which etcd cluster answered a registry's reads, at which raft term, and each member's
    raft index. A cluster keeps its id for life, its term never goes down (a linearizable read
    waits for the leader of the current term), and neither does a member's raft log index.
    One restored from a backup (``etcdctl snapshot restore``) starts again at term 1 (2 after
    its first election) with a log of one entry a member (measured on 3.4: index 64 before, 44
    after the restore and 40 writes), and with another ``--initial-cluster-token`` under
    another id. So an answer from another id, at a lower term, or from a member at a lower
    index tells a restore even when the restored cluster's revision has already passed the one
    a watch had seen (writes since: behind ``etcd grpc-proxy`` a host may learn of the restore
    only then). The index comes from etcd's ``Status``, which only a watch-only host's pulse
    asks (:func:`status_checked`): on a host with a lease, a restore under the same token of a
    cluster at its first term is told by the revision alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cluster = self.term = 0
        self._index: dict[int, int] = {}  # member id -> the highest raft index it answered

    def changed(self, cluster: int, term: int, member: int = 0, index: int = 0) -> str:
        """Why an answer from ``cluster`` at ``term`` (0: not compared), from ``member`` at raft
        ``index`` (0: none), comes from a restored cluster ("": it does not); it becomes the
        one seen."""
        with self._lock:
            why, before = "", self._index.get(member, 0)
            if self.cluster and cluster and cluster != self.cluster:
                why = (f"etcd cluster {cluster:x} answered, not {self.cluster:x} seen here "
                       "(restored from a backup?)")
            elif self.cluster and 0 < term < self.term:
                why = (f"etcd answered at raft term {term}, below the {self.term} seen here "
                       "(restored from a backup?)")
            elif member and 0 < index < before:
                why = (f"etcd member {member:x} answered at raft index {index}, below the "
                       f"{before} seen here (restored from a backup?)")
            if cluster:
                self.cluster = cluster
            if term:
                self.term = term if why else max(term, self.term)
            if why:
                self._index.clear()  # another history
            if member and index:
                self._index[member] = max(index, self._index.get(member, 0))
            return why


def checked(watches: Collection[Rewindable], read: Callable[[], T],
            header: Callable[[T], Any], cluster: ClusterSeen | None = None) -> T:
    """``read()``, a linearizable read, whose answer's etcd ``header`` (revision, cluster id,
    raft term) is compared with what each watch had seen before it: on a cluster that has not
    gone back in time it is never behind (see the watch's ``rewound``), and with what
    ``cluster`` had seen (:class:`ClusterSeen`)."""
    before = [(w, w.seen) for w in watches]
    result = read()
    h = header(result)
    now = int(h.revision)
    why = cluster.changed(int(h.cluster_id), int(h.raft_term)) if cluster is not None else ""
    for w, seen in before:
        if why or now < seen:
            w.rewound(now, why)
    return result


def status_checked(watches: Collection[Rewindable], status: Callable[[], Any],
                   cluster: ClusterSeen) -> None:
    """``status()``, etcd's ``Status`` of one member, whose cluster id and raft index are
    compared with what ``cluster`` had seen (:class:`ClusterSeen`). Not its revision nor its
    term: a member's own, not linearizable, they may lag behind another member's."""
    answer = status()
    h = answer.header
    why = cluster.changed(int(h.cluster_id), 0, int(h.member_id), int(answer.raftIndex))
    if why:
        for w in watches:
            w.rewound(int(h.revision), why)
