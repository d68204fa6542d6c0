"""Making a ZooKeeper registry's instance nodes ours: the ephemeral nodes of this session.

:meth:`ZkClaims.claim` writes one instance: a new one's node and its index node
(:mod:`~discovery.registry.zk_index`) in one transaction; one of an earlier session's taken
over with its index node in one transaction too (readers never see it missing, and no crash
leaves it without its index node); this session's own updated. After a session
expiry every node of the old session is gone, and :meth:`ZkClaims.claim_together` creates them
all again, many instances in one transaction: a fleet that lost its sessions at once (an
ensemble down for longer than the session timeout) sends one request a host, not two round
trips an instance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
)

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.model.nerve import to_nerve
from discovery.model.validate import shown
from discovery.registry.base import packs
from discovery.registry.owned import restamped
from discovery.registry.security import zk_open_acl
from discovery.registry.url import RegistryURL
from discovery.registry.zk_index import ZkNodeIndex, session_of
from discovery.registry.zk_nerve import NerveNodes

log = logging.getLogger(__name__)
#: errors of one node, not of the connection or the ensemble: a batch goes on without it
_NODE_ERRORS = (NoNodeError, NoAuthError, BadVersionError, NodeExistsError)
#: instances created again in one transaction after a session expiry (two nodes each)
CLAIM_TOGETHER = 100
#: and at most this many bytes of their data and paths: ZooKeeper closes the connection on a
#: request over ``jute.maxbuffer`` (1 MB by default), and the loss looked transient: resent
#: for ever, the host's connection dropped every 1-2 s (30 instances of 64 labels of 512 B)
CLAIM_BYTES = 512 * 1024


class ZkClaims:
    """The instance nodes one registry wrote; ``get`` waits for a kazoo async result, ``acl``
    is the registry's default ACL (None: the registry has no credentials)."""

    def __init__(self, client: Any, url: RegistryURL, get: Callable[[Any], Any],
                 index: ZkNodeIndex, nerve: NerveNodes | None, acl: Any, where: str) -> None:
        self.client, self.url, self._get = client, url, get
        self._index, self._nerve, self._acl, self._where = index, nerve, acl, where
        self._checked: set[str] = set()  # service dirs whose ACL we looked at
        #: key -> the session that wrote its node
        self.written: dict[tuple[str, str], int] = {}

    def claim(self, inst: Instance) -> None:
        """The instance node of ``inst`` and its index node: a new instance's, or a
        predecessor's taken over, in one transaction; an update of ours, the node's data
        (its index node is there already, or claimed again: Nerve's layout, or a lost one)."""
        if self._nerve is None and self._create_both(inst):
            return
        self._claim(inst)
        created = self._nerve.path(inst.key) if self._nerve is not None else None
        self._index.claim(inst, created.rpartition("/")[2] if created else None)

    def _create_both(self, inst: Instance) -> bool:
        """Create the node of a new instance and its index node in one transaction (one round
        trip), so that no crash leaves the instance without the index node through which a
        restarted agent finds what its predecessor wrote. False: one is there already (an
        update, a predecessor's node to take over) or the transaction failed otherwise: left
        to :meth:`_claim` and the index's own claim, which say why."""
        session, key = session_of(self.client), inst.key
        if not self._index.enabled or session is None or self.written.get(key) == session:
            return False
        index = self._index.path(inst.node, *key)
        self._check_parent(self.url.service_dir(inst.service))
        for first in (True, False):
            results = self._create_all([inst], session)
            if results is None:
                return True
            if not first or not any(isinstance(r, NoNodeError) for r in results):
                return False
            for parent in (self.url.service_dir(inst.service), index.rpartition("/")[0]):
                self._get(self.client.ensure_path_async(parent))
        return False

    def _claim(self, inst: Instance) -> None:
        """Make the ephemeral node of ``inst`` ours and hold its data (one round trip usually;
        a node of no session, made by hand, is taken over)."""
        key, c = inst.key, self.client
        path, data = self.url.key(*key), inst.to_json()
        session = session_of(c)
        if session is None:
            raise ConnectionLoss()
        if self._nerve is not None:
            self._nerve.claim(inst, session)
            self.written[key] = session
            return
        if self.written.get(key) == session:
            try:
                if self._get(c.set_async(path, data)).ephemeralOwner:
                    return
                # a node of no session (made by hand: it would outlive ours): taken over below
            except NoNodeError:
                pass
        self._check_parent(self.url.service_dir(inst.service))
        for _ in range(5):
            try:
                self._get(c.create_async(path, data, ephemeral=True, makepath=True))
                self.written[key] = session
                return
            except NodeExistsError:
                pass
            try:
                _, stat = self._get(c.get_async(path))
                if stat.ephemeralOwner == session:
                    self._get(c.set_async(path, data, version=stat.version))
                    self.written[key] = session
                    return
                log.info("taking over %s from ZooKeeper session %x", shown(path),
                         stat.ephemeralOwner)
                # one transaction: readers never see the instance missing in between, and no
                # crash leaves it ours without its index node
                txn = c.transaction()
                txn.delete(path, version=stat.version)
                txn.create(path, data, ephemeral=True)
                self._index.add_take_over(txn, inst, session)
                results = self._get(txn.commit_async())
                if not any(isinstance(r, Exception) for r in results):
                    self.written[key] = session
                    self._index.claimed([inst], session)
                    return
            except (NoNodeError, BadVersionError):
                continue
        raise RegistryError(f"ZooKeeper at {self._where}: {shown(path)} keeps changing under us")

    def restore(self, inst: Instance, decode: Callable[[str, bytes, float], Any],
                same: Callable[[Instance, Instance], bool]) -> str:
        """Write ``inst`` (:func:`~discovery.registry.owned.restamped`) again, its node deleted
        or changed by another writer, if it was this session's: read first (a member's local
        read; a failed create is a write all the same), then, missing (``"deleted"``), created
        in one transaction with a check that its index node is still there (where a claim
        takes five round trips), or both through :meth:`claim` if that is gone too (Nerve's
        layout: the claim, unless another node of the instance is there); holding a value not
        ``same`` as it (``"changed"``), set with the version read; held by no session (made
        by hand: it would outlive ours), taken over through the claim. ``""``: nothing
        written (there as it was, or another session's now: a successor's)."""
        return self.restore_many([inst], decode, same).get(inst.key, "")

    def restore_many(self, insts: list[Instance], decode: Callable[[str, bytes, float], Any],
                     same: Callable[[Instance, Instance], bool]) -> dict[tuple[str, str], str]:
        """:meth:`restore` of each of ``insts`` (what it wrote, by key), their reads sent
        together, then the creates of those deleted together: two round trips for all of
        those, not two each (behind a fleet's write-backs, each waited seconds in the
        session's queue, every host reading every node written back); a changed node is still
        set in turn, and under Nerve's layout, or with its index node gone, each is claimed
        alone."""
        session, out = session_of(self.client), {}
        reading = [(inst, path, self.client.get_async(path) if path is not None else None)
                   for inst in insts if session is not None
                   and self.written.get(inst.key) == session
                   for path in [self.path_of(inst.key)]]
        creating: list[tuple[Instance, Any]] = []
        for inst, path, read in reading:
            with _alone(inst, len(reading) > 1):
                out[inst.key] = self._after_read(inst, path, read, session, decode, same,
                                                 creating)
        for fresh, committed in creating:
            with _alone(fresh, len(reading) > 1):
                out[fresh.key] = self._created(fresh, self._get(committed))
        return out

    def _after_read(self, inst: Instance, path: str | None, read: Any, session: int | None,
                    decode: Callable[[str, bytes, float], Any],
                    same: Callable[[Instance, Instance], bool],
                    creating: list[tuple[Instance, Any]]) -> str:
        """:meth:`restore` of ``inst`` once its node's ``read`` is answered: a create goes to
        ``creating`` (sent now, answered later: ``""`` until then)."""
        fresh = restamped(inst)  # what is written; compared: ``inst``
        try:
            if path is None or read is None:
                raise NoNodeError()
            data, stat = self._get(read)
        except NoNodeError:
            if self._nerve is not None:
                return "" if self._nerve.held_elsewhere(inst.node, inst.key) else self._again(fresh)
            creating.append((fresh, self._create(fresh).commit_async()))
            return ""
        if stat.ephemeralOwner == 0 and self._nerve is None:
            self.claim(fresh)  # takes a node of no session over, in one transaction
            return "changed"
        if stat.ephemeralOwner != session or (
                (seen := decode(path, data, stat.mtime / 1000)) is not None and same(inst, seen)):
            return ""
        return self._set(path, fresh, stat.version)

    def _set(self, path: str, fresh: Instance, version: int) -> str:
        record = to_nerve(fresh) if self._nerve is not None else fresh.to_json()
        with contextlib.suppress(BadVersionError):  # changed again: its own turn
            self._get(self.client.set_async(path, record, version=version))
            return "changed"
        return ""

    def path_of(self, key: tuple[str, str]) -> str | None:
        """The node of ``key`` (Nerve's layout: the one this client created; None: none)."""
        return self._nerve.path(key) if self._nerve is not None else self.url.key(*key)

    def _create(self, inst: Instance) -> Any:
        """The transaction that creates the node of ``inst`` again, with a check of its index
        node."""
        txn = self.client.transaction()
        txn.create(self.url.key(*inst.key), inst.to_json(), ephemeral=True)
        if self._index.enabled:
            txn.check(self._index.path(inst.node, *inst.key), -1)  # -1: any version
        return txn

    def _created(self, inst: Instance, results: list[Any]) -> str:
        if not any(isinstance(r, Exception) for r in results):
            return "deleted"
        if isinstance(results[0], NodeExistsError):
            return ""  # created meanwhile (a session recovery, the agent): theirs to write
        return self._again(inst)  # its index node gone too (the prefix deleted), or its dir

    def _again(self, inst: Instance) -> str:
        self._index.unclaim(inst.key)
        self.claim(inst)
        return "deleted"

    def remove(self, key: tuple[str, str], node: str) -> None:
        """Delete the instance node of ``key`` and its index node under ``node``: in one
        transaction when both are there (no crash leaves the instance without the index node
        a restarted agent finds it by); else the instance's, then the index node."""
        path = self.url.key(*key)
        if self._index.enabled:
            txn = self.client.transaction()
            txn.delete(path)
            txn.delete(self._index.path(node, *key))
            if not any(isinstance(r, Exception) for r in self._get(txn.commit_async())):
                return
        with contextlib.suppress(NoNodeError):
            self._get(self.client.delete_async(path))
        self._index.delete(node, key)

    def claim_together(self, owned: list[Instance]) -> list[Instance]:
        """A new session's first writes: each instance node and its index node, up to
        ``CLAIM_TOGETHER`` instances and ``CLAIM_BYTES`` in one transaction (an instance
        larger than that alone). Returns what is left to
        :meth:`claim` one by one: all of a part whose transaction failed (a node is still
        there: of another session, or of ours after a lost answer; a parent is gone), and
        everything with Nerve's layout (sequential nodes)."""
        session = session_of(self.client)
        if self._nerve is not None or session is None:
            return owned
        left: list[Instance] = []
        for part in packs(owned, self._size, CLAIM_TOGETHER, CLAIM_BYTES):
            if self._create_all(part, session) is not None:
                left += part
        return left

    def _size(self, inst: Instance) -> int:
        """The bytes of :meth:`_create_all`'s creates of ``inst`` (its data and paths)."""
        paths = [self.url.key(*inst.key)]
        if self._index.enabled:
            paths.append(self._index.path(inst.node, *inst.key))
        return len(inst.to_json()) + sum(len(path.encode()) for path in paths)

    def _create_all(self, part: list[Instance], session: int) -> list[Any] | None:
        """Create the nodes of ``part`` and their index nodes in one transaction: None once
        they are this session's, else the transaction's answers (what failed)."""
        txn = self.client.transaction()
        for inst in part:
            txn.create(self.url.key(*inst.key), inst.to_json(), ephemeral=True)
            self._index.add_create(txn, inst)
        results: list[Any] = self._get(txn.commit_async())
        if any(isinstance(r, Exception) for r in results):
            return results
        for inst in part:
            self.written[inst.key] = session
        self._index.claimed(part, session)
        return None

    def _check_parent(self, path: str) -> None:
        """Once per service dir, with credentials: warn (in the background) if anyone may delete
        our nodes there (it was made with an open ACL, e.g. before the registry was secured)."""
        if self._acl is None or path in self._checked:
            return
        self._checked.add(path)

        def done(result: Any) -> None:
            try:
                acls = result.get()[0]
            except KazooException as exc:  # a check we could not make: nothing to warn of
                log.debug("ACL of %s not read: %r", shown(path), exc)
                return
            if entries := zk_open_acl(acls):
                log.warning("ZooKeeper node %s lets anyone delete the instances in it (ACL "
                            "%s); see docs/security.md", shown(path), entries)

        self.client.get_acls_async(path).rawlink(done)


@contextlib.contextmanager
def _alone(inst: Instance, batch: bool) -> Iterator[None]:
    """In a batch, an error of ``inst``'s node alone (:data:`_NODE_ERRORS`: its own ACL,
    deleted or changed again before the set; a claim that failed) leaves it to the agent's
    reconcile and the others go on; any other error (the connection's, an ensemble that
    throttles) ends the call, which ``ZkRegistry._op`` may try again whole (its reads tell
    what landed)."""
    try:
        yield
    except (*_NODE_ERRORS, RegistryError) as exc:
        if not batch:
            raise
        log.warning("writing %s/%s back: %s %s; left to the agent's reconcile", *inst.key,
                    type(exc).__name__, exc)
