"""A ZooKeeper follower's full read: every followed service's instance nodes, at once.

:class:`~discovery.registry.zk_watch.ZkWatch` reads everything when it starts and after a
session expired (``reset``); this is that read. It lists the services (or only the followed
ones: their directories, not the list of services), then reads their nodes, arming the
one-shot watches a follower without persistent watches needs through ``watch_for``. Such a
follower's one-shot watch on a listing (the list of services, a service's directory) tells it
to list that again: :func:`relist`, by the same rules (a directory gone, or refused to us,
is left out). A directory the full read may not list is named in the snapshot (withheld: the
catalog keeps what it had of that service) and listed again later, :class:`Withheld`. And
:func:`unread_holders`: under Nerve, the nodes of a service the follower has not read yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from kazoo.exceptions import NoAuthError, NoNodeError

from discovery.model import Instance
from discovery.model.validate import shown
from discovery.registry.base import RegistryURL, Snapshot
from discovery.registry.decoder import Decoder
from discovery.registry.reads import ReadStats
from discovery.retry import RetryAt

log = logging.getLogger(__name__)

Key = tuple[str, str]
#: the one-shot watch a read of an item (``("svc", name)``...) sets, or None
WatchFor = Callable[[tuple[str, str]], Callable[[Any], None] | None]
#: ``(path, (data, stat))`` of each node of the paths given that exists, in order
ReadNodes = Callable[[list[str]], Iterable[tuple[str, tuple[bytes, Any]]]]


class LivePaths:
    """The instance each node holds (``path -> key``) and, the other way, the nodes holding
    each instance (several only under Nerve, while a restarted reporter's old node is still
    there), so that a node's delete finds the other holders of its instance in O(1), not in a
    walk over every followed node (a watcher following a whole fleet's catalog)."""

    def __init__(self) -> None:
        self._key: dict[str, Key] = {}
        self._paths: dict[Key, set[str]] = {}

    def __len__(self) -> int:
        return len(self._key)

    def get(self, path: str) -> Key | None:
        return self._key.get(path)

    def set(self, path: str, key: Key) -> None:
        self.pop(path)
        self._key[path] = key
        self._paths.setdefault(key, set()).add(path)

    def pop(self, path: str) -> Key | None:
        key = self._key.pop(path, None)
        if key is not None:
            holders = self._paths[key]
            holders.discard(path)
            if not holders:
                del self._paths[key]
        return key

    def holders(self, key: Key) -> list[str]:
        """The nodes that hold ``key``, in a stable order."""
        return sorted(self._paths.get(key, ()))


@dataclass
class Scan:
    """What a full read found: the snapshot, the newest zxid seen, the services listed, each
    node's mzxid and the instance each node holds."""

    snapshot: Snapshot
    newest: int = 0
    svcs: set[str] = field(default_factory=set)
    nodes: dict[str, int] = field(default_factory=dict)
    live: LivePaths = field(default_factory=LivePaths)


def scan(client: Any, url: RegistryURL, decoder: Decoder, only: Collection[str] | None,
         reads: ReadStats, read_nodes: ReadNodes, watch_for: WatchFor) -> Scan:
    """Read everything ``only`` (None: all services) names, arming the watches."""
    services = url.services_root
    if only is not None:  # those services' directories, not the list of services
        children, newest = sorted(only), 0
        client.exists(services)  # a first answer: last_zxid below is the server's of now
    else:
        try:
            children, stat = client.get_children(services, watch=watch_for(("services", "")),
                                                 include_data=True)
        except NoNodeError:
            client.exists(services, watch=watch_for(("services", "")))
            return Scan(Snapshot(revision=max(client.last_zxid, 1)))
        newest = stat.pzxid
    found = Scan(Snapshot(revision=max(client.last_zxid, 1)), newest)
    paths: list[str] = []
    denied: dict[str, NoAuthError] = {}  # service -> why we may not list its directory
    for s in children:
        svc_dir = url.service_dir(s)
        try:
            nodes, st = client.get_children(svc_dir, watch=watch_for(("svc", s)),
                                            include_data=True)
        except NoNodeError:
            if only is not None or svc_dir != f"{services}/{s}":
                client.exists(svc_dir, watch=watch_for(("svc", s)))
            continue
        except NoAuthError as exc:  # left out, named as withheld (below)
            denied[s] = exc
            continue
        found.svcs.add(s)
        found.newest = max(found.newest, st.pzxid)
        paths += [f"{svc_dir}/{n}" for n in sorted(nodes)]  # Nerve: the newest node wins
    if denied and not found.svcs:
        raise next(iter(denied.values()))  # none may be listed: our credentials (say so)
    for s in denied:
        decoder.denied(url.service_dir(s))
    instances: dict[Key, Instance] = {}
    for path, (data, st) in read_nodes(paths):
        found.nodes[path] = st.mzxid
        reads.add(path, data)
        found.newest = max(found.newest, st.mzxid)
        inst = decoder.decode(path, data, st.mtime / 1000)
        if inst is not None:
            found.live.set(path, inst.key)
            instances[inst.key] = inst
    found.snapshot = Snapshot(instances=instances, revision=found.snapshot.revision,
                              withheld=frozenset(denied))
    return found


class Withheld:
    """The services a full read could not list (NoAuth on their directory: an ACL changed by
    mistake), whose instances the catalog keeps (:attr:`Snapshot.withheld`). Their
    directories are listed again (one request each, nothing read) after a wait doubling from
    ``wait[0]`` to ``wait[1]`` (jittered: a fleet refused at one moment asks apart); once one
    may be listed, or is gone, everything is read again, so a kept instance does not stay
    stale once the ACL is fixed."""

    def __init__(self, wait: tuple[float, float]) -> None:
        self.services: frozenset[str] = frozenset()
        self.retry = RetryAt(*wait)

    def scanned(self, snapshot: Snapshot) -> None:
        """A full read gave ``snapshot``: look again later at what it withheld."""
        self.services = snapshot.withheld
        if self.services:
            self.retry.failed(jitter=0.1)
        else:
            self.retry.succeeded()

    def readable(self, client: Any, url: RegistryURL) -> bool:
        """List each withheld directory: whether one may be listed now (or is gone)."""
        for s in sorted(self.services):
            try:
                client.get_children(url.service_dir(s))
            except NoAuthError:
                continue
            except NoNodeError:
                pass
            log.info("ZooKeeper lets us list %s again: reading everything",
                     shown(url.service_dir(s)))
            return True
        wait = self.retry.failed(jitter=0.1)
        log.debug("still refused: %s; listed again in %.1f s", sorted(self.services), wait)
        return False


def relist(client: Any, url: RegistryURL, decoder: Decoder, only: Collection[str] | None,
           reads: ReadStats, svcs: set[str], nodes: dict[str, int], item: tuple[str, str],
           watch: Callable[[Any], None] | None) -> list[tuple[str, str]]:
    """List ``item`` again (``("services", "")``: the services; ``("svc", name)``: that
    service's directory), arming ``watch``, and return what to read next: the services and
    nodes not in ``svcs`` and ``nodes`` yet (added there), or ``item`` itself (made
    meanwhile). A service directory we may not list is left out as :func:`scan` leaves it out
    (named, counted; listed again at the next change of the list of services, or the next full
    read): one directory planted against us must not stall every change of the catalog (it
    cost each follower a 5 s wait and a full read). The list of services refused: raised.
    """
    kind, name = item
    services = url.services_root
    folder = services if kind == "services" else url.service_dir(name)
    try:
        children = client.get_children(folder, watch=watch)
    except NoNodeError:
        svcs.discard(name)  # made meanwhile (a followed service, Nerve's path= below one)?
        again = kind == "services" or only is not None or folder != f"{services}/{name}"
        return [item] if again and client.exists(folder, watch=watch) is not None else []
    except NoAuthError:
        if kind == "services":
            raise  # our credentials, or its ACL changed: the caller says so, reads it all again
        svcs.discard(name)
        decoder.denied(folder)
        return []
    reads.listed(children)
    if kind == "services":
        fresh = [s for s in children if s not in svcs]
        svcs.update(fresh)
        return [("svc", s) for s in fresh]
    paths = [f"{folder}/{child}" for child in children if f"{folder}/{child}" not in nodes]
    nodes.update(dict.fromkeys(paths, 0))
    return [("node", path) for path in paths]


def unread_holders(client: Any, url: RegistryURL, key: Key, nodes: dict[str, int],
                   read_node: Callable[[str], None], live: LivePaths) -> list[str]:
    """A Nerve node gone while its instance's other node (a restarted reporter's) may not be
    read yet: read the service's nodes not read yet (listed meanwhile, or still queued) with
    ``read_node`` (which puts each as it is read) and return those that hold ``key``."""
    folder = url.service_dir(key[0])
    try:
        children = client.get_children(folder)
    except NoNodeError:
        return []
    for child in children:
        path = f"{folder}/{child}"
        if not nodes.get(path):  # never read: read it now, in order
            nodes.setdefault(path, 0)
            read_node(path)
    return live.holders(key)
