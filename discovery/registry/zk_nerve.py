"""Writing our instances as Airbnb Nerve does (``zk://…?format=nerve``).

Nerve's reporter creates one ephemeral *sequential* node per instance, ``<dir>/<id>_`` plus
ZooKeeper's 10-digit sequence, so a node cannot be addressed by a fixed key: this keeps a map
instance → the path ZooKeeper created (and the session that created it). Re-writing an
instance in the same session sets that node's data; in a new session (after an expiry, or a
restart) it creates a new node, then removes the other nodes left under the same ``<id>_``
prefix, so readers never see the instance missing and never see it twice for long. Those are
found in the host's index (:mod:`~discovery.registry.zk_index`), a listing of its own
instances, where the layout has one; in the service's directory, a listing of the fleet's,
where it has none, for a key the index may miss (read without an index entry, or whose
create's answer was lost, :meth:`NerveNodes.unindexed`: looked for again by each claim until
a look succeeds, even one that only updates the data, or the key's deregister). The record
itself is :func:`discovery.model.nerve.to_nerve`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.exceptions import NoNodeError

from discovery.model import Instance
from discovery.model.nerve import node_prefix, to_nerve
from discovery.model.validate import shown
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)
Key = tuple[str, str]
#: the names of a key's nodes in a node's index: (node, key) -> names, None without an index
Named = Callable[[str, Key], "list[str] | None"]


class NerveNodes:
    """Our instances' sequential nodes on ``client``; ``get`` waits for a kazoo async result,
    ``named`` lists a key's nodes in a host's index."""

    def __init__(self, client: Any, url: RegistryURL, get: Callable[[Any], Any],
                 named: Named) -> None:
        self.client, self.url, self._get, self._named = client, url, get, named
        self._lock = threading.Lock()
        self._paths: dict[Key, tuple[str, int]] = {}  # key -> (created path, session id)
        self._unindexed: set[Key] = set()  # keys read with no index entry (see unindexed)

    def path(self, key: Key) -> str | None:
        with self._lock:
            entry = self._paths.get(key)
        return entry[0] if entry else None

    def claim(self, inst: Instance, session: int) -> None:
        """Make ZooKeeper hold ``inst`` in a node of ``session`` (one round trip usually)."""
        data = to_nerve(inst)
        with self._lock:
            known = self._paths.get(inst.key)
        if known is not None and known[1] == session:
            try:
                self._get(self.client.set_async(known[0], data))
            except NoNodeError:
                pass  # deleted behind our back: create it again
            else:
                with self._lock:
                    lost = inst.key in self._unindexed
                if lost:  # an older node's removal failed: look for it again
                    self._remove(inst.node, inst.key, keep=known)
                return
        folder = self.url.service_dir(inst.service)
        try:
            created = self._get(self.client.create_async(
                f"{folder}/{inst.id}_", data, ephemeral=True, sequence=True, makepath=True))
        except Exception:  # its answer lost, perhaps not the node: the next claim looks for it
            self.unindexed([inst.key])
            raise
        with self._lock:
            self._paths[inst.key] = (created, session)
        self._remove(inst.node, inst.key, keep=(created, session))

    def delete(self, key: Key, node: str) -> None:
        """Remove ``key``'s node, and any other node under its ``<id>_`` prefix that ``node``'s
        index names (left by an earlier run of this agent); the service's directory is listed
        only where there is no index, or for a key it may miss (:meth:`unindexed`: a create
        whose answer was lost, a node read without an index entry). Listing it at every
        deregister cost each a listing of the fleet's instances of that service (~190 KB at
        5,000). A missing node is not an error."""
        with self._lock:
            entry = self._paths.pop(key, None)
        try:
            self._remove(node, key, keep=None, known=entry[0] if entry else None)
        except Exception:  # its retry must find the node again (the index may not name it)
            if entry is not None:
                with self._lock:
                    self._paths.setdefault(key, entry)
            raise

    def held_elsewhere(self, node: str, key: Key) -> bool:
        """Whether a node of ``key`` other than ours is named in ``node``'s index (or, with no
        index, in the service's directory): a successor's, made in its own session, whose
        claim removed ours. Ours gone with no other: deleted by another writer."""
        return bool(self._nodes_of(node, key) - {self.path(key)})

    def _nodes_of(self, node: str, key: Key, listed: bool = False) -> set[str]:
        """The paths of ``key``'s nodes that ``node``'s index names, and those in the service's
        directory if there is no index or ``listed``."""
        folder = self.url.service_dir(key[0])
        children = self._named(node, key)
        if children is None or listed:
            with contextlib.suppress(NoNodeError):
                children = (children or []) + self._get(self.client.get_children_async(folder))
        return {f"{folder}/{child}" for child in children or () if node_prefix(child) == key[1]}

    def unindexed(self, keys: Iterable[Key]) -> None:
        """``keys`` were found without an index entry (written by a version before it): their
        older nodes are looked for in the service's directory."""
        with self._lock:
            self._unindexed.update(keys)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._paths.pop(key, None)

    def _remove(self, node: str, key: Key, keep: tuple[str, int] | None,
                known: str | None = None) -> None:
        """Delete the nodes named ``<id>_<seq>`` of ``key`` except ``keep`` (the node just
        created): ``known``, those ``node``'s index lists, and those in the service's directory
        if the index has none or may miss some (:meth:`unindexed`). Our claims of a key are
        one at a time, so another node of ours is one whose create's answer was lost."""
        with self._lock:
            unindexed = key in self._unindexed
        paths = self._nodes_of(node, key, listed=unindexed)
        for path in sorted(paths | ({known} if known else set())):
            if keep is not None and path == keep[0]:
                continue
            with contextlib.suppress(NoNodeError):
                if keep is not None:
                    _, stat = self._get(self.client.get_async(path))
                    log.info("Nerve node %s of session %x replaced by %s", shown(path),
                             stat.ephemeralOwner, shown(keep[0]))
                self._get(self.client.delete_async(path))
        with self._lock:  # only once every older node is gone (a failed listing: again)
            self._unindexed.discard(key)
