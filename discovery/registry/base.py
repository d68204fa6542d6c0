"""The registry interface every backend implements, and what it hands its readers.

Keys: ``<prefix>/services/<service>/<instance-id>`` holding an instance's JSON; with
``zk://…?format=nerve``, Airbnb Nerve's layout (``<prefix>/<service>/<id>_<sequence>``, or
``path=`` with ``{service}``: see :mod:`discovery.model.nerve`). Which backend, where, and
how: the registry URL (:mod:`~discovery.registry.url`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from discovery.model import Instance
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """Every valid instance in the registry, read at one point (``revision``). A reader
    keeps what it had of what the read could not see, until the registry lets it (a service
    locked by mistake, or one bad write, must not empty it on every host at the next reset):
    ``withheld``: services the registry would not let this client read (etcd: its role;
    ZooKeeper: its directory's ACL); ``unreadable``: entries there but not read (a value that
    does not decode, e.g. a newer ``schema``; ZooKeeper: a node whose own ACL denies us).
    ``unowned`` (a node's snapshot only): entries written with no lease (etcd) or as nodes of
    no session (ZooKeeper), by hand: they would outlive the host; its reconcile writes them.
    ``scope``: the services the read covered (None: every one); what a reader holds of others
    it no longer follows (a watcher's SIGHUP dropped them), not removed from the registry."""

    instances: dict[tuple[str, str], Instance] = field(default_factory=dict)
    revision: int = 0
    withheld: frozenset[str] = frozenset()
    unreadable: frozenset[tuple[str, str]] = frozenset()
    unowned: frozenset[tuple[str, str]] = frozenset()
    scope: frozenset[str] | None = None

    def covers(self, service: str) -> bool:
        """Whether the read covered ``service`` (a reader not following it drops what it had)."""
        return self.scope is None or service in self.scope

    def keeps(self, key: tuple[str, str]) -> bool:
        """Whether a reader keeps what it had at ``key`` though it is not in ``instances``."""
        return key[0] in self.withheld or key in self.unreadable


@dataclass(frozen=True)
class Change:
    """One thing that happened in the registry.

    ``put``: ``instance`` was written. ``delete``: ``key`` is gone.
    ``reset``: the watch could not be resumed; ``snapshot`` is the whole new truth.
    ``drained``: a delete that came right after the entry was changed, read too late to see
    what it was changed to (ZooKeeper's events carry no data): taken for the agent's
    departure, which writes ``draining`` and then deletes (:mod:`~discovery.registry.
    zk_pending` says where that inference fails). The wipe guard never holds such a delete.
    """

    kind: Literal["put", "delete", "reset"]
    key: tuple[str, str] = ("", "")
    instance: Instance | None = None
    snapshot: Snapshot | None = None
    revision: int = 0
    drained: bool = False
    #: a put written with no lease (etcd) or as a node of no session (ZooKeeper): by hand
    unowned: bool = False
    #: a put of the wipe guard's, of an instance it had let go before the wipe was seen: no
    #: write of anyone's (not timed as one: watcher.core)
    put_back: bool = False


ChangeCallback = Callable[[Change], None]
StateCallback = Callable[[bool], None]
#: a watch's ``start_revision`` that reads first: :meth:`Registry.watch`
FIRST_READ = -1


class Watch(Protocol):
    def stop(self) -> None: ...


class Registry(Protocol):
    """What every backend offers. All methods are thread-safe."""

    url: RegistryURL
    #: what this client has read (``discovery_registry_read_bytes_total``)
    reads: ReadStats

    @property
    def invalid_records(self) -> int:
        """How many stored values were skipped as malformed so far (see registry.decoder)."""

    def register(self, instance: Instance) -> None:
        """Write (or overwrite) an instance owned by this process; it lives as long as we do."""

    def deregister(self, service: str, instance_id: str) -> None:
        """Remove an instance; removing a missing one is not an error."""

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        """All valid instances (``services``: of those services only), read consistently.
        Malformed entries are skipped with a warning."""

    def node_snapshot(self, node: str) -> Snapshot:
        """The valid instances of ``node`` (any writer's: an earlier run's too), read through
        a per-node index: what it costs grows with that node's instances, not the registry."""

    def watch(self, callback: ChangeCallback, start_revision: int = 0,
              services: Collection[str] | None = None) -> Watch:
        """Call ``callback`` for every change after ``start_revision`` until stopped
        (``services``: of those services only).

        Survives disconnects: resumes where it left off (a ``reset`` only when that is
        impossible: etcd compacted the revision, the ZooKeeper session expired).
        :data:`FIRST_READ`: all followed is read first, handed to ``callback`` as a ``reset``
        before this returns (a failed read raises ``RegistryError``, leaving no watch), then
        every change after it. ZooKeeper's read arming its watches is that snapshot. 0: from
        when the watch is established, which may be after this returns (a change written
        right after may come before it, and is not told): pass a revision read first to be
        sure."""

    def add_state_listener(self, callback: StateCallback) -> None:
        """Told True/False when the connection to the registry comes and goes."""

    def close(self, revoke: bool = True) -> None:
        """Stop everything; with ``revoke``, remove all this process registered (only what is
        still its own: not what a successor took over). Without, what it registered lives
        until its lease or session times out, as after a SIGKILL, for a successor to adopt."""


def deliver(callback: ChangeCallback, change: Change, stopped: threading.Event) -> None:
    """Hand one change to a watch callback; a failing callback is logged, never fatal."""
    if stopped.is_set():
        return
    try:
        callback(change)
    except Exception:
        log.exception("registry watch callback failed on %s", change.kind)


def read_first(start_revision: int, snapshot: Callable[[], Snapshot],
               callback: ChangeCallback) -> int:
    """Where a watch from ``start_revision`` starts, reading nothing first itself: for
    :data:`FIRST_READ`, at ``snapshot()``'s revision, handed to ``callback`` as a ``reset``."""
    if start_revision != FIRST_READ:
        return start_revision
    snap = snapshot()
    deliver(callback, Change("reset", snapshot=snap, revision=snap.revision), threading.Event())
    return snap.revision


def packs(items: Iterable[T], size: Callable[[T], int], most: int, most_size: int,
          ) -> Iterator[list[T]]:
    """``items`` in order, in groups of at most ``most`` items and ``most_size`` of their
    ``size`` together (the parts of a batch of requests); an item larger than ``most_size``
    is a group of its own."""
    pack: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if pack and (len(pack) == most or used + n > most_size):
            yield pack
            pack, used = [], 0
        pack.append(item)
        used += n
    if pack:
        yield pack
