"""A ZooKeeper follower's full read: every followed service's instance nodes, at once.

:class:`~discovery.registry.zk_watch.ZkWatch` reads everything when it starts and after a
session expired (``reset``); this is that read. It lists the services (or only the followed
ones: their directories, not the list of services), then reads their nodes, arming the
one-shot watches a follower without persistent watches needs through ``watch_for``. Such a
follower's one-shot watch on a listing (the list of services, a service's directory) tells it
to list that again: :func:`relist`, by the same rules (a directory gone, or refused to us,
is left out). A directory the full read may not list is named in the snapshot (withheld: the
catalog keeps what it had of that service) and listed again later
(:class:`~discovery.registry.zk_setback.Withheld`). And
:func:`other_holders`: the other nodes of a gone node's instance (under Nerve, first reading the
nodes of its service the follower has not read yet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kazoo.exceptions import NoAuthError, NoNodeError

from discovery.model import Instance
from discovery.model.nerve import node_prefix
from discovery.registry.base import Snapshot
from discovery.registry.decoder import Decoder
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL
from discovery.registry.zk_multi import ManyReads

log = logging.getLogger(__name__)

Key = tuple[str, str]
#: the one-shot watch a read of an item (``("svc", name)``...) sets, or None
WatchFor = Callable[[tuple[str, str]], Callable[[Any], None] | None]
#: ``(path, (data, stat))`` of each node of the paths given that exists, in order; those we
#: may not read (NoAuth) added to the list given
ReadNodes = Callable[[list[str], list[str]], Iterable[tuple[str, tuple[bytes, Any]]]]
#: the instance a node held when last read (Nerve: its id is in its data), or None
Known = Callable[[str], "Key | None"]


class LivePaths:
    """The instance each node holds (``path -> key``) and, the other way, the nodes holding
    each instance (several only under Nerve, while a restarted reporter's old node is still
    there), so that a node's delete finds the other holders of its instance in O(1), not in a
    walk over every followed node (a watcher following a whole fleet's catalog)."""

    def __init__(self) -> None:
        self._key: dict[str, Key] = {}
        #: key -> its node, or a set of them (a set apiece cost a follower of 10,000 nodes
        #: 2.2 MB: one node each but under Nerve)
        self._paths: dict[Key, str | set[str]] = {}

    def __len__(self) -> int:
        return len(self._key)

    def get(self, path: str) -> Key | None:
        return self._key.get(path)

    def set(self, path: str, key: Key) -> None:
        self.pop(path)
        self._key[path] = key
        held = self._paths.setdefault(key, path)
        if isinstance(held, set):
            held.add(path)
        elif held != path:
            self._paths[key] = {held, path}

    def pop(self, path: str) -> Key | None:
        key = self._key.pop(path, None)
        if key is not None:
            held = self._paths[key]
            if isinstance(held, str):
                del self._paths[key]
            else:
                held.discard(path)
                if len(held) == 1:
                    self._paths[key] = next(iter(held))
        return key

    def holders(self, key: Key) -> list[str]:
        """The nodes that hold ``key``, in a stable order."""
        held = self._paths.get(key)
        return [] if held is None else [held] if isinstance(held, str) else sorted(held)


@dataclass
class Scan:
    """What a full read found: the snapshot, the newest zxid seen, the services listed, each
    node's mzxid, the instance each node holds and the nodes kept though refused to us."""

    snapshot: Snapshot
    newest: int = 0
    svcs: set[str] = field(default_factory=set)
    nodes: dict[str, int] = field(default_factory=dict)
    live: LivePaths = field(default_factory=LivePaths)
    refused: frozenset[str] = frozenset()


def scan(client: Any, url: RegistryURL, decoder: Decoder, only: Collection[str] | None,
         reads: ReadStats, read_nodes: ReadNodes, watch_for: WatchFor,
         known: Known | None = None) -> Scan:
    """Read everything ``only`` (None: all services) names, arming the watches. A node there
    but unreadable (its data does not decode, or its ACL denies us) is named in the
    snapshot's ``unreadable`` and kept in ``live`` (its delete is news), by ``known``."""
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
    refused: list[str] = []  # there, but we may not read them (NoAuth)
    bad: list[str] = []  # read, but not decoded
    for path, st, inst in decoded(read_nodes(paths, refused), decoder, reads):
        found.nodes[path] = st.mzxid
        found.newest = max(found.newest, st.mzxid)
        if inst is not None:
            found.live.set(path, inst.key)
            instances[inst.key] = inst
        else:
            bad.append(path)
    kept = unreadable(url, refused + bad, instances, known)
    for path, key in kept.items():
        found.live.set(path, key)
    # looked at again: those read before (a node planted locked is not polled for ever)
    found.refused = frozenset(p for p in refused if p in kept and known and known(p))
    found.snapshot = Snapshot(instances=instances, revision=found.snapshot.revision,
                              withheld=frozenset(denied), unreadable=frozenset(kept.values()))
    return found


def decoded(nodes: Iterable[tuple[str, tuple[bytes, Any]]], decoder: Decoder,
            reads: ReadStats) -> Iterator[tuple[str, Any, Instance | None]]:
    """``(path, stat, instance)`` of each node read (counted in ``reads``); the instance None
    where its data does not decode."""
    for path, (data, st) in nodes:
        reads.add(path, data)
        yield path, st, decoder.decode(path, data, st.mtime / 1000)


def read_nodes(client: Any, many: ManyReads | None, decoder: Decoder, watch_for: WatchFor,
               paths: list[str], refused: list[str]) -> Iterator[tuple[str, tuple[bytes, Any]]]:
    """``(path, (data, stat))`` of each node of ``paths`` that exists, in order: many a
    request with ``many`` (``multiRead``, under a persistent watch: a full read after a
    session expiry is a few requests, not one per instance), else one each (the read arms
    its one-shot watch), all sent before the first answer is waited for: a batch of nodes
    queued together is one round trip, not one a node. Those we may not read (NoAuth) are
    added to ``refused``."""
    if many is not None:
        yield from many.each(paths, refused)
        return
    sent = [(path, client.get_async(path, watch=watch_for(("node", path)))) for path in paths]
    for path, answer in sent:
        try:
            yield path, answer.get()
        except NoNodeError:
            continue
        except NoAuthError:
            decoder.denied(path)
            refused.append(path)


def unreadable(url: RegistryURL, bad: Iterable[str], instances: Collection[Key],
               known: Known | None = None) -> dict[str, Key]:
    """The instance of each node of ``bad`` (there, but not read) that no other node holds:
    a reader keeps its last good value (:attr:`Snapshot.unreadable`). Nerve's node names do
    not say the instance (its port is in the data): ``known`` does, or nothing is kept."""
    out: dict[str, Key] = {}
    for path in bad:
        key = (known(path) if known is not None else None) if url.nerve else url.split_key(path)
        if key is not None and key not in instances:
            out[path] = key
    return out


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


def other_holders(client: Any, url: RegistryURL, path: str, key: Key, nodes: dict[str, int],
                  read_node: Callable[[str], None], live: LivePaths, decoder: Decoder,
                  answered: tuple[Callable[[str], list[str]], Callable[[str], None]] | None = None,
                  listed: tuple[dict[str, int], int] | None = None) -> list[str]:
    """The nodes but ``path`` that hold ``key`` (``path``'s instance until now). Under Nerve,
    when none is known, a restarted reporter's other node may not be read yet: the service's
    nodes not read yet (listed meanwhile, or still queued) are read with ``read_node`` (which
    puts each as it is read) first. Raises what the listing raises (``path`` still held).
    ``answered``: (the nodes of a directory answered but not handed on, the hand-on), for the
    answer to a live event of a persistent watch while nothing but such answers is queued (not
    one of a reconnect's catch-up, a read the worker made itself, nor while a relist or a
    node's read waits: a node made in an outage has no event). Live events come in
    zxid order and their reads are answered in the order sent, so a node created before
    ``path``'s delete has its answer in already: those of nodes never read are handed on, and
    nothing is listed (a listing per departure per follower: 44 KB at 2,000 nodes). A
    directory we may not list (NoAuth) is named with ``decoder``; its nodes known but not read
    yet are read, and no other node is taken to hold ``key`` (before, a directory whose ACL
    changed cost every follower 5 s and a full read, the instance routed everywhere
    meanwhile). ``listed``: (each directory listed here -> the zxid seen before that listing
    was sent, all its nodes read since; a zxid by which ``path`` was seen gone or changed): a
    listing sent after that shows every node made before, so it is not listed again (a
    refused one counts: a burst is not refused once a node). The
    deletes of a burst read together (a dead host's nodes, a catch-up) share one listing;
    before, N deletes among M nodes listed N times, N x M entries a follower."""
    others = [p for p in live.holders(key) if p != path]
    if others or not url.nerve:
        return others
    folder = url.service_dir(key[0])
    if answered is not None:
        found, hand_on = answered
        for node in found(folder):
            if node != path and not nodes.get(node):
                hand_on(node)
        return [p for p in live.holders(key) if p != path]
    if listed is not None and listed[1] <= listed[0].get(folder, -1):
        return []  # (none held it above)
    before = client.last_zxid  # the listing shows every change up to it
    try:
        children = client.get_children(folder)
    except NoNodeError:
        children = []
    except NoAuthError:  # named, as relist does; the nodes listed before and not read yet
        decoder.denied(folder)  # are read instead (one may hold it), and with none the
        children = [p.rpartition("/")[2] for p, z in list(nodes.items())  # departure is
                    if not z and p.rpartition("/")[0] == folder]  # delivered
    for child in children:
        child_path = f"{folder}/{child}"
        if not nodes.get(child_path):  # never read: read it now, in order
            nodes.setdefault(child_path, 0)
            read_node(child_path)
    if listed is not None:  # (only once every node is read: a failed read lists again)
        listed[0][folder] = max(before, listed[0].get(folder, before))
    return [p for p in live.holders(key) if p != path]


def full_read(c: Any, url: RegistryURL, many: ManyReads, decoder: Decoder, reads: ReadStats,
              get: Callable[[Any], Any], only: Collection[str] | None = None,
              ours: Callable[[str], bool] | None = None,
              known: Known | None = None) -> Snapshot:
    """Every instance (``only``: of those services), in three rounds of requests (the
    services, their children, their data: ``many``); ``get`` waits for a kazoo result.
    ``ours``: only the entries whose name (a Nerve node's without its sequence) it takes are
    read, the others listed alone (a node's own: :func:`~discovery.model.instance.made_on`).
    ``known``: what a Nerve node not read held (:func:`unreadable`)."""
    reads.full_read()
    try:
        services = (sorted(set(only)) if only is not None
                    else get(c.get_children_async(url.services_root)))
        if only is not None:  # a first answer: the zxid below is the server's of now
            get(c.exists_async(url.services_root))
    except NoNodeError:
        return Snapshot(revision=max(c.last_zxid, 1))
    # Every change up to this zxid is in what we read from now on.
    revision = max(c.last_zxid, 1)
    refused: list[str] = []  # the directories we may not list: withheld
    dirs = many.children([url.service_dir(s) for s in services], refused)
    paths = []
    for d, children in dirs.items():
        reads.listed(children)
        paths += [f"{d}/{child}" for child in sorted(children)  # Nerve: the newest wins
                  if ours is None or ours(node_prefix(child))]
    instances: dict[tuple[str, str], Instance] = {}
    bad: list[str] = []  # there, but not read (NoAuth), or not decoded
    for path, _, inst in decoded(many.each(paths, bad), decoder, reads):
        if inst is not None:
            instances[inst.key] = inst
        else:
            bad.append(path)
    return Snapshot(instances=instances, revision=revision, withheld=frozenset(
        s for s in services if url.service_dir(s) in refused), unreadable=frozenset(
        unreadable(url, bad, instances, known).values()))
