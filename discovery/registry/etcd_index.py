"""The per-node index of an etcd registry, so an agent's reconcile costs what its node holds.

Next to each instance ``<prefix>/services/<service>/<id>`` the backend keeps an empty key
``<prefix>/nodes/<node>/<service>/<id>``, written **in the same transaction and on the same
lease** as the instance, and deleted in the same transaction as it. :func:`read_node` reads
one node's entries: one keys-only range read of ``<prefix>/nodes/<node>/``, then the
instances it names in transactions of ``TXN_OPS`` gets (:mod:`~discovery.registry.etcd_read`)
— bytes proportional to the node's own instances, whatever the size of the fleet (a
whole-registry read at 100,000 instances is ~25 MB; one node's 20 instances are ~10 KB).

An agent restarted on the same node finds its predecessor's entries (another lease) the same
way, and adopts them by writing both keys again on its own lease. Readers of
``<prefix>/services/`` (snapshots, watches) never see the index: it is outside that prefix.

When the two disagree:

- an index key whose instance is gone (deleted by hand): skipped (it goes with its lease);
- an index key naming an instance of another node (written by hand): skipped;
- an instance without an index key (written by hand, or by a version before the index):
  not seen by :func:`read_node`, so a restarted agent does not adopt it: it stays until its
  own lease expires, and the agent's checks start from "unhealthy" for that container;
- an instance of the registry's own whose index key is gone (the index deleted by hand, an
  ``etcdctl del --prefix`` of ``<prefix>/nodes/``): :func:`reindex` puts back its index key
  alone if it is there as written, on the registry's lease. Before, the agent's reconcile,
  not seeing it, wrote it again, stamped anew: a put under ``<prefix>/services/`` that every
  host following its service received (a whole fleet's index deleted: every instance of the
  fleet, once, to every watcher of its service).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

from pyetcd import transactions
from pyetcd.utils import prefix_range_end

from discovery.errors import RegistryDenied
from discovery.model import Instance, id_node
from discovery.registry.base import Snapshot
from discovery.registry.etcd_read import TXN_OPS, Caller, Decode
from discovery.registry.owned import restamped
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)


def node_root(url: RegistryURL, node: str) -> str:
    """``<prefix>/nodes/<node>/``: the index of one node."""
    return f"{url.prefix}/nodes/{node}/"


def index_key(url: RegistryURL, node: str, service: str, instance_id: str) -> str:
    return f"{node_root(url, node)}{service}/{instance_id}"


def put(call: Caller, client: Any, url: RegistryURL, inst: Instance, lease: int,
        mod: int | None = None) -> bool:
    """The instance and its index key, in one transaction, on ``lease``; with ``mod``, only
    if the instance's key is still at that mod revision (0: not there). True if written."""
    key = url.key(inst.service, inst.id)
    ops = [transactions.Put(key, inst.to_json(), lease),
           transactions.Put(index_key(url, inst.node, inst.service, inst.id), b"", lease)]
    compare = [] if mod is None else [transactions.Mod(key) == mod]
    written, _ = call(f"put {key}{'' if mod is None else ' back'}", partial(
        client.transaction, compare=compare, failure=[], success=ops))
    return bool(written)


def write_back(call: Caller, client: Any, url: RegistryURL, inst: Instance, lease: int,
               decode: Decode, same: Callable[[Instance, Instance], bool]) -> str:
    """Put ``inst`` (:func:`~discovery.registry.owned.restamped`) back on ``lease`` if a
    linearizable read finds it missing (``"deleted"``), or holding a value that is not
    ``same`` as it or no lease (written by hand: it would outlive this host) (``"changed"``),
    in one transaction comparing the mod revision read; ``""``: nothing written (there as it
    was, written again meanwhile, or on another lease: a successor's adoption, not ours to
    undo)."""
    key = url.key(inst.service, inst.id)
    value, meta = call(f"read {key}", partial(client.get, key))
    if value is not None and (meta.lease_id not in (lease, 0) or (
            meta.lease_id and (seen := decode(key, value)) is not None and same(inst, seen))):
        return ""
    mod = 0 if value is None else meta.mod_revision
    return ("deleted" if value is None else "changed") if put(
        call, client, url, restamped(inst), lease, mod) else ""


def drop_late(call: Caller, client: Any, url: RegistryURL, key: tuple[str, str],
              lease: int) -> None:
    """Delete the instance ``key`` and its index key if the instance is there on ``lease`` (a
    write of ours that landed late): read it, then delete both in one transaction comparing
    its mod revision, so that this delete, landing late itself, never takes a newer write."""
    path = url.key(*key)
    value, meta = call(f"read {path}", partial(client.get, path))
    if value is None or meta.lease_id != lease:
        return
    node = id_node(key[1])
    call(f"delete {path} (written back late)", partial(
        client.transaction, compare=[transactions.Mod(path) == meta.mod_revision],
        failure=[], success=[transactions.Delete(path),
                             transactions.Delete(index_key(url, node, *key))]))


def put_all(put: Callable[[Instance], object], instances: Iterable[Instance],
            done: set[tuple[str, str]]) -> None:
    """``put`` each of ``instances`` not in ``done`` (each written is added to it): one etcd
    refuses (its service's role) does not keep the others from being written, and the round
    that tries again writes only what was refused (each write reaches every host that follows
    its service); the refusal is raised after them."""
    denied: RegistryDenied | None = None
    for inst in instances:
        if inst.key in done:
            continue
        try:
            put(inst)
            done.add(inst.key)
        except RegistryDenied as exc:
            denied = exc
    if denied is not None:
        raise denied


def delete(call: Caller, client: Any, url: RegistryURL, service: str, instance_id: str,
           node: str | None) -> None:
    """The instance and (``node`` known) its index key, in one transaction."""
    key = url.key(service, instance_id)
    ops = [transactions.Delete(key)]
    if node:
        ops.append(transactions.Delete(index_key(url, node, service, instance_id)))
    call(f"delete {key}", partial(client.transaction, compare=[], failure=[], success=ops))


def read_node(call: Caller, client: Any, url: RegistryURL, decode: Decode, node: str,
              reads: ReadStats) -> tuple[Snapshot, Any]:
    """Every valid instance of ``node`` that the index names (see the module docstring), and
    the header of the linearizable read of the index."""
    root = node_root(url, node)
    resp = call(f"read index of node {node}",
                partial(client.get_range_response, root.encode(),
                        prefix_range_end(root.encode()), keys_only=True))
    reads.node_read()
    keys: list[str] = []
    for kv in resp.kvs:
        reads.add(kv.key, None)
        parts = kv.key.decode("utf-8", "replace")[len(root):].split("/")
        if len(parts) == 2 and all(parts):
            keys.append(url.key(*parts))
    instances: dict[tuple[str, str], Instance] = {}
    unowned: set[tuple[str, str]] = set()
    gone = 0
    for start in range(0, len(keys), TXN_OPS):
        chunk = keys[start:start + TXN_OPS]
        _, results = call(f"read {len(chunk)} instances of node {node}",
                          partial(client.transaction, compare=[], failure=[],
                                  success=[transactions.Get(k) for k in chunk]))
        for result in results:
            gone += not result
            for value, meta in result:
                reads.add(meta.key, value)
                inst = decode(meta.key.decode("utf-8", "replace"), value)
                if inst is not None and inst.node == node:
                    instances[inst.key] = inst
                    if not meta.lease_id:  # written by hand: it would outlive the host
                        unowned.add(inst.key)
    if gone:
        log.debug("index of node %s names %d instance(s) no longer there", node, gone)
    return Snapshot(instances=instances, revision=int(resp.header.revision),
                    unowned=frozenset(unowned)), resp.header


def reindex(call: Caller, client: Any, url: RegistryURL, snap: Snapshot, node: str,
            owned: Iterable[Instance], lease: int, decode: Decode,
            same: Callable[[Instance, Instance], bool], reads: ReadStats) -> Snapshot:
    """``snap`` (``node``'s :func:`read_node`) with those of ``owned`` (the registry's, of
    ``node``) it lacks that are there ``same`` as written and on ``lease``: their index keys
    were deleted by another writer. Each one's index key alone is put back on ``lease``, by a
    transaction comparing the instance's mod revision with the one read: only beside the
    instance it names, unchanged since (never one deleted, written again, or moved to another
    lease meanwhile). One transaction for each ``TXN_OPS`` of them, after the read of those;
    if one changed meanwhile it fails, and those still unchanged are tried once more. No put under
    ``<prefix>/services/``: no watcher hears of it. The others lacking (missing, changed,
    another lease's) are left out: the agent's reconcile writes them.
    Reads only what it lacks of ``owned`` (nothing when the index is whole)."""
    lacking = [i for i in owned if i.node == node and i.key not in snap.instances]
    found: dict[tuple[str, str], Instance] = {}

    def put_back(there: list[tuple[Instance, str, int]]) -> None:
        """One transaction for ``there``; refused (one changed meanwhile), its failure side
        reads them all, and those still unchanged are tried once more together."""
        for _ in range(2):
            put, now = call(f"put {len(there)} index key(s) of node {node}", partial(
                client.transaction, failure=[transactions.Get(key) for _, key, _ in there],
                compare=[transactions.Mod(key) == mod for _, key, mod in there],
                success=[transactions.Put(index_key(url, node, *seen.key), b"", lease)
                         for seen, _, _ in there]))
            if put:
                found.update({seen.key: seen for seen, _, _ in there})
                return
            there = [one for one, kv in zip(there, now, strict=True)
                     if kv and kv[0][1].mod_revision == one[2]]
            if not there:
                return

    for start in range(0, len(lacking), TXN_OPS):
        chunk = lacking[start:start + TXN_OPS]
        _, results = call(f"read {len(chunk)} instances missing from the index of node {node}",
                          partial(client.transaction, compare=[], failure=[],
                                  success=[transactions.Get(url.key(*i.key)) for i in chunk]))
        there: list[tuple[Instance, str, int]] = []  # (as read, its key, its mod revision)
        for inst, result in zip(chunk, results, strict=True):
            for value, meta in result:
                reads.add(meta.key, value)
                key = url.key(*inst.key)
                seen = decode(key, value)
                if meta.lease_id == lease and seen is not None and same(inst, seen):
                    there.append((seen, key, meta.mod_revision))  # (else: the reconcile's)
        if there:
            put_back(there)
    if found:
        log.warning("%d index key(s) of node %s were deleted by another writer; put back "
                    "(their instances unchanged)", len(found), node)
    return replace(snap, instances={**snap.instances, **found}) if found else snap
