"""The per-node index of a ZooKeeper registry, so an agent's reconcile costs what its node holds.

Next to each instance node ``<prefix>/services/<service>/<id>`` the backend keeps an empty
EPHEMERAL node ``<prefix>/nodes/<node>/<service>/<id>`` of the same session, created in the
same transaction as a new instance and deleted in one with it (so no crash of the agent leaves
one without the other); both go when the session ends. :meth:`read` reads one
node's entries: the index's children, then the instances they name (three requests) — bytes
proportional to the node's own instances, whatever the size of the fleet. Readers of
``<prefix>/services`` never see the index (it is outside that path).

An agent restarted on the same node finds its predecessor's entries (another session) the
same way; adopting one re-creates both nodes in its own session, in one transaction (delete
the old ones, create ours).

When the two disagree:

- an index node whose instance is gone (deleted by hand): skipped; it goes with its session;
- an index node naming an instance of another node (written by hand): skipped;
- an instance without an index node (written by hand, or by a version before the index):
  not seen by :meth:`read`. A restarted agent does not adopt it (it goes with its old
  session);
- an index node of ours deleted by hand, its instance still of our session as we wrote it:
  :meth:`read` creates the index node again alone (no watcher hears of it); one changed
  meanwhile is left out, and the reconcile writes it again with its index node.

With Nerve's layout (``?format=nerve``) an instance's node is ``<id>_<sequence>``, named by
ZooKeeper, so its index node carries that name: ``<prefix>/nerve-nodes/<node>/<service>/
<id>_<seq>`` (apart from ours: both may share a prefix), created right after the sequential
node (not in the same transaction: the sequence is not known before); a claim in a new session
removes the older index nodes of the same ``<id>_``. :meth:`read` is the same three requests.
The index lives beside the services, so it needs them elsewhere than under ``<prefix>``:
Airbnb's ``path=<prefix>/services/{service}/...`` has it; a layout whose services are
``<prefix>``'s children has none (:attr:`enabled` False: callers list everything instead), nor
has one whose index ZooKeeper refuses (a Nerve fleet's ACLs: :meth:`refused`). What it may
miss (nodes of a version before it, or of a predecessor that died between the two creates) is
found by a node's first read, which lists every service's directory too and reads the nodes
its agent names (:meth:`discovery.registry.zk.ZkRegistry.node_snapshot`); a layout with no
index does so at every read.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import (
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    RolledBackError,
    RuntimeInconsistency,
)

from discovery.model import Instance, id_node
from discovery.model.nerve import node_prefix
from discovery.model.validate import shown
from discovery.registry.base import Snapshot
from discovery.registry.decoder import Decoder
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL
from discovery.registry.zk_multi import ManyReads

log = logging.getLogger(__name__)
Key = tuple[str, str]


def session_of(client: Any) -> int | None:
    """The id of a kazoo ``client``'s session, None while it has none."""
    session: int | None = (client.client_id or (None,))[0]
    return session


class ZkNodeIndex:
    """The index nodes of one ZooKeeper registry; ``get`` waits for a kazoo async result."""

    def __init__(self, client: Any, url: RegistryURL, get: Callable[[Any], Any],
                 decoder: Decoder, reads: ReadStats, many: ManyReads,
                 as_written: Callable[[Key, Instance], bool] = lambda key, seen: False) -> None:
        self.client, self.url, self._get, self._many = client, url, get, many
        #: whether an instance read is one of the registry's own, settled, as it wrote it
        #: (apart from write stamps): one whose index node alone is gone gets it back
        self._decoder, self._reads, self._as_written = decoder, reads, as_written
        # Nerve's apart from ours: a Nerve URL with path= may keep the default prefix, where
        # an agent of our layout keeps its index (migration.md runs both on one host)
        self.base = f"{url.prefix}/{'nerve-nodes' if url.nerve else 'nodes'}"
        self.enabled = apart(self.base, url.services_root)
        self._lock = threading.Lock()
        #: key -> (session, name) of the index node we know is there
        self._mine: dict[Key, tuple[int, str]] = {}
        self._nodes: dict[Key, str] = {}  # key -> its node, from read()

    def root(self, node: str) -> str:
        return f"{self.base}/{node}"

    def refused(self, exc: NoAuthError) -> bool:
        """Whether the index is off since ZooKeeper refused it (Nerve's layout only: its
        fleet's ACLs may not let us under the prefix; ours needs it, docs/security.md)."""
        if not self.url.nerve:
            return False
        if self.enabled:
            log.warning("ZooKeeper refused the index of Nerve's layout under %s (%s): each "
                        "resync lists the whole registry (docs/security.md)", shown(self.base),
                        exc)
        self.enabled = False
        return True

    def path(self, node: str, service: str, name: str) -> str:
        return f"{self.root(node)}/{service}/{name}"

    def claim(self, inst: Instance, name: str | None = None) -> None:
        """Make the index node of ``inst`` one of our session's (after the instance's own, when
        that was not created with it: :meth:`add_create`);
        ``name``: its node's (Nerve: ``<id>_<sequence>``), by default its id."""
        if not self.enabled:
            return
        c, name = self.client, name or inst.id
        session = session_of(c)
        with self._lock:
            if session is None or self._mine.get(inst.key) == (session, name):
                return
        path = self.path(inst.node, inst.service, name)
        try:
            if not self._create(path, session):
                log.warning("ZooKeeper index node %s keeps changing; the next resync retries",
                            shown(path))
                return
            if name != inst.id:  # Nerve's: the index nodes of the instance's older nodes go
                self._remove(inst.node, inst.key, keep=name)
        except NoAuthError as exc:
            if self.refused(exc):
                return
            raise
        with self._lock:
            self._mine[inst.key] = (session, name)
            self._nodes[inst.key] = inst.node

    def unclaim(self, key: Key) -> None:
        """Forget that ``key``'s index node is ours: the next :meth:`claim` makes sure."""
        with self._lock:
            self._mine.pop(key, None)

    def _create(self, path: str, session: int) -> bool:
        """Make the index node ``path`` ours; False if it keeps changing under us."""
        c = self.client
        for _ in range(5):
            try:
                self._get(c.create_async(path, b"", ephemeral=True, makepath=True))
                return True
            except NodeExistsError:
                pass
            stat = self._get(c.exists_async(path))
            if stat is None:
                continue
            if stat.ephemeralOwner == session:
                return True
            txn = c.transaction()  # a predecessor's (or a hand-made) node: make it ours
            txn.delete(path, version=stat.version)
            txn.create(path, b"", ephemeral=True)
            if not any(isinstance(r, Exception) for r in self._get(txn.commit_async())):
                return True
        return False

    def add_create(self, txn: Any, inst: Instance) -> None:
        """Add the creation of the index node of ``inst`` to ``txn`` (a transaction that
        creates the instance too)."""
        if self.enabled:
            txn.create(self.path(inst.node, inst.service, inst.id), b"", ephemeral=True)

    def add_take_over(self, txn: Any, inst: Instance, session: int) -> None:
        """Add to ``txn`` (the take-over of an earlier session's instance node) making the
        index node of ``inst`` ours: created, or taken over from that session too."""
        if not self.enabled:
            return
        path = self.path(inst.node, inst.service, inst.id)
        stat = self._get(self.client.exists_async(path))
        if stat is None:  # (a transaction makes no parents)
            self._get(self.client.ensure_path_async(path.rpartition("/")[0]))
        elif stat.ephemeralOwner == session:
            return
        else:
            txn.delete(path, version=stat.version)
        txn.create(path, b"", ephemeral=True)

    def claimed(self, insts: list[Instance], session: int) -> None:
        """The index nodes of ``insts`` are ``session``'s (:meth:`add_create` committed)."""
        if self.enabled:
            with self._lock:
                for inst in insts:
                    self._mine[inst.key] = (session, inst.id)
                    self._nodes[inst.key] = inst.node

    def node_of(self, key: Key, owned: Instance | None) -> str:
        """The node an instance being removed is indexed under (owned, read, or its id's)."""
        with self._lock:
            self._mine.pop(key, None)
            known = self._nodes.pop(key, None)
        return owned.node if owned is not None else known or id_node(key[1])

    def named(self, node: str, key: Key) -> list[str] | None:
        """The names of the Nerve nodes of ``key`` that ``node``'s index holds (None: no
        index, ask the service's directory)."""
        if not self.enabled:
            return None
        try:
            children = self._get(self.client.get_children_async(f"{self.root(node)}/{key[0]}"))
        except NoNodeError:
            return []
        except NoAuthError as exc:
            if self.refused(exc):
                return None
            raise
        return [child for child in children if child != key[1] == node_prefix(child)]

    def delete(self, node: str, key: Key) -> None:
        if self.url.nerve:
            self._remove(node, key, keep=None)
        elif self.enabled:
            with contextlib.suppress(NoNodeError):
                self._get(self.client.delete_async(self.path(node, *key)))

    def _remove(self, node: str, key: Key, keep: str | None) -> None:
        for name in self.named(node, key) or ():
            if name != keep:
                with contextlib.suppress(NoNodeError):
                    self._get(self.client.delete_async(self.path(node, key[0], name)))

    def read(self, node: str) -> Snapshot | None:
        """Every valid instance of ``node`` that the index names: three requests (the index
        root, its service directories, the instances; :mod:`~discovery.registry.zk_multi`).
        None: refused, and so off (:meth:`refused`)."""
        c, root = self.client, self.root(node)
        self._reads.node_read()
        revision = max(c.last_zxid, 1)
        try:
            services = self._get(c.get_children_async(root))
            dirs = self._many.children([f"{root}/{s}" for s in services])
        except NoNodeError:
            services, dirs = [], {}
        except NoAuthError as exc:
            if self.refused(exc):
                return None
            raise
        paths = []
        self._reads.listed(services)
        for s in services:
            names = sorted(dirs.get(f"{root}/{s}", ()))  # the newest of a Nerve instance's last
            self._reads.listed(names)
            paths += [self.url.key(s, name) for name in names]
        found = self._many.data(paths)  # an index node without its instance: left out
        instances: dict[Key, Instance] = {}
        unowned: set[Key] = set()  # nodes of no session: by hand, they would outlive the host
        for path, (data, stat) in found.items():
            self._reads.add(path, data)
            inst = self._decoder.decode(path, data, stat.mtime / 1000)
            if inst is not None and inst.node == node:
                instances[inst.key] = inst
                if not stat.ephemeralOwner and not self.url.nerve:  # (Nerve's: not taken
                    unowned.add(inst.key)  # over, its own nodes sequential)
        with self._lock:  # an index node we thought there and is not: create it again
            lacking = {k: was for k, was in self._mine.items() if self._nodes.get(k) == node
                       and k not in instances}
        instances.update(self._put_back(node, list(lacking)))
        with self._lock:  # (not one claimed meanwhile: a session's recovery)
            for key, was in lacking.items():
                if key not in instances and self._mine.get(key) == was:
                    self._mine.pop(key, None)
            self._nodes.update(dict.fromkeys(instances, node))
        return Snapshot(instances=instances, revision=revision, unowned=frozenset(unowned))

    def _put_back(self, node: str, keys: list[Key]) -> dict[Key, Instance]:
        """Those of ``keys`` (index nodes of ours that :meth:`read` did not find: deleted by
        another writer) whose instance node is there, of our session and as we wrote it: their
        index node alone created again, each in one transaction that checks the instance
        node's version as read (so never beside one deleted or changed since, and never over
        another session's index node: a successor's); all sent before the first answer is
        waited for (:meth:`_check_create`). Before, the reconcile set the instance's node
        again, stamped anew, which every watcher of its service read (a fleet's index deleted:
        every instance of the fleet). Any other failure leaves the key to the reconcile, as
        before. Not Nerve's layout (its index nodes name sequential nodes)."""
        session = session_of(self.client)
        if not keys or self.url.nerve or session is None:
            return {}
        candidates: dict[str, tuple[Instance, int]] = {}  # path -> (instance, its version)
        for path, (data, stat) in self._many.data([self.url.key(*k) for k in keys]).items():
            self._reads.add(path, data)
            inst = self._decoder.decode(path, data, stat.mtime / 1000)
            if (inst is not None and inst.node == node and stat.ephemeralOwner == session
                    and self._as_written(inst.key, inst)):
                candidates[path] = (inst, stat.version)
        outcome = self._check_create({path: (version, self.path(node, *inst.key))
                                      for path, (inst, version) in candidates.items()})
        found = {candidates[p][0].key: candidates[p][0] for p, exc in outcome.items() if not exc}
        failed = [f"{shown(p)} ({type(exc).__name__})" for p, exc in outcome.items() if exc]
        if found:
            log.warning("%d index node(s) of node %s were deleted by another writer; put back "
                        "(their instances unchanged)", len(found), shown(node))
        if failed:
            log.warning("index node(s) of node %s not put back, left to the reconcile: %s",
                        shown(node), ", ".join(failed[:5]) + (" ..." if failed[5:] else ""))
        return found

    def _check_create(self, puts: dict[str, tuple[int, str]]) -> dict[str, Exception | None]:
        """For each ``path -> (version, index)``: create ``index`` if the node ``path`` is still
        at ``version``, in one transaction each (one failing fails no other), all sent before
        the first answer is waited for: one round trip, however many (before: one each). Those
        whose parent was missing: it is made, and they are sent once more. Returns each
        path's outcome: None, or the failing operation's error (refused, the check failed,
        the index node there); a lost connection raises."""
        outcome: dict[str, Exception | None] = {}
        for first in (True, False):
            sent = []
            for path, (version, index) in puts.items():
                txn = self.client.transaction()
                txn.check(path, version)
                txn.create(index, b"", ephemeral=True)
                sent.append((path, txn.commit_async()))
            again: dict[str, tuple[int, str]] = {}
            for path, answer in sent:
                results = self._get(answer)
                errors = [r for r in results if isinstance(r, Exception)  # the failing op's
                          and not isinstance(r, RolledBackError | RuntimeInconsistency)]
                if first and errors and isinstance(results[1], NoNodeError):  # (a transaction
                    again[path] = puts[path]  # makes no parent: made, then once more)
                else:
                    outcome[path] = errors[0] if errors else None
            parents = {parent: self.client.ensure_path_async(parent) for parent in
                       {index.rpartition("/")[0] for _, index in again.values()}}
            for parent, made in parents.items():
                try:
                    self._get(made)
                except NoAuthError as exc:  # refused: those under it left to the reconcile
                    for path in [p for p, (_, i) in again.items() if i.startswith(f"{parent}/")]:
                        outcome[path] = exc
                        del again[path]
            if not (puts := again):
                break
        return outcome


def apart(a: str, b: str) -> bool:
    """Neither ZooKeeper path is the other or under it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return not (a.startswith(b) or b.startswith(a))
