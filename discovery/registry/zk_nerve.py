"""Writing our instances as Airbnb Nerve does (``zk://…?format=nerve``).

Nerve's reporter creates one ephemeral *sequential* node per instance, ``<dir>/<id>_`` plus
ZooKeeper's 10-digit sequence, so a node cannot be addressed by a fixed key: this keeps a map
instance → the path ZooKeeper created (and the session that created it). Re-writing an
instance in the same session sets that node's data; in a new session (after an expiry, or a
restart) it creates a new node, then removes the nodes of other sessions left under the same
``<id>_`` prefix, so readers never see the instance missing and never see it twice for long.
The record itself is :func:`discovery.model.nerve.to_nerve`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import NoNodeError

from discovery.model import Instance
from discovery.model.nerve import node_prefix, to_nerve
from discovery.model.validate import shown
from discovery.registry.base import RegistryURL

log = logging.getLogger(__name__)
Key = tuple[str, str]


class NerveNodes:
    """Our instances' sequential nodes on ``client``; ``get`` waits for a kazoo async result."""

    def __init__(self, client: Any, url: RegistryURL, get: Callable[[Any], Any]) -> None:
        self.client, self.url, self._get = client, url, get
        self._lock = threading.Lock()
        self._paths: dict[Key, tuple[str, int]] = {}  # key -> (created path, session id)

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
                return
            except NoNodeError:
                pass  # deleted behind our back: create it again
        folder = self.url.service_dir(inst.service)
        created = self._get(self.client.create_async(
            f"{folder}/{inst.id}_", data, ephemeral=True, sequence=True, makepath=True))
        with self._lock:
            self._paths[inst.key] = (created, session)
        self._remove(folder, inst.id, keep=(created, session))

    def delete(self, key: Key) -> None:
        """Remove ``key``'s node, and any other node under its ``<id>_`` prefix (left by an
        earlier run of this agent); a missing node is not an error."""
        with self._lock:
            self._paths.pop(key, None)
        self._remove(self.url.service_dir(key[0]), key[1], keep=None)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._paths.pop(key, None)

    def owned(self, session: int) -> list[str]:
        """The paths this session created (removed on close)."""
        with self._lock:
            return [path for path, owner in self._paths.values() if owner == session]

    def _remove(self, folder: str, instance_id: str, keep: tuple[str, int] | None) -> None:
        """Delete the nodes named ``<instance_id>_<seq>`` in ``folder``, except ``keep`` (the
        node just created) and, when keeping one, other nodes of the same session."""
        try:
            children = self._get(self.client.get_children_async(folder))
        except NoNodeError:
            return
        for child in children:
            path = f"{folder}/{child}"
            if node_prefix(child) != instance_id or (keep is not None and path == keep[0]):
                continue
            with contextlib.suppress(NoNodeError):
                if keep is not None:
                    _, stat = self._get(self.client.get_async(path))
                    if stat.ephemeralOwner == keep[1]:
                        continue
                    log.info("Nerve node %s of session %x replaced by %s", shown(path),
                             stat.ephemeralOwner, shown(keep[0]))
                self._get(self.client.delete_async(path))
