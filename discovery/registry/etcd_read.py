"""Full reads of an etcd prefix: paginated, consistent at one revision, bounded in size.

gRPC refuses a message larger than the channel's receive limit (4 MiB by default), and etcd
answers a range read in one message: an unpaginated read of a large registry fails outright.
:func:`read_snapshot` therefore reads ``PAGE_KEYS`` keys at a time (``limit``), continuing
from the last key + ``"\\x00"``, every page after the first at the first page's revision, so
the result is the registry exactly as it was at that revision. If that revision is compacted
mid-read, the read starts again. A page larger than the receive limit is asked again with half
the keys; a single value larger than it is skipped with a warning, as is any value larger
than ``max_value``. The limits and why: docs/operations.md, "Large registries".

With ``services``, each service's prefix is read on its own, but many prefixes in one
transaction (:func:`_read_many`): first how many keys each holds (``count_only``, up to
``TXN_OPS`` prefixes a request), then the prefixes themselves, packed up to ``page_keys`` keys a
request, all at the first request's revision. A watcher routing 1,000 services reads them in
about 20 requests, not 1,000; a prefix of more than ``page_keys`` keys is paged as above. A
service the registry user may not read (etcd denies the whole transaction: it is halved down
to that service) is left out, named in the snapshot's ``withheld`` (a reader keeps what it had
of it) and, once the read stands, told to ``denied`` (a warning, as a malformed entry is): one
service missing from a role must not keep a watcher from every other one. Only when every one
is denied does the read fail (the credentials, then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

import grpc
from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from discovery.errors import RegistryDenied, RegistryError
from discovery.model import Instance
from discovery.model.validate import shown
from discovery.registry.base import Snapshot, packs
from discovery.registry.reads import ReadStats

log = logging.getLogger(__name__)
#: ``Decoder.decode``: the stored value at a key as an Instance, or None (skipped)
Decode = Callable[[str, bytes], Instance | None]
#: told each service prefix etcd would not let this client read (left out of the read)
Denied = Callable[[str], None]
#: ``RegistryURL.split_key``: the instance a key is for, None for a key outside the layout
Split = Callable[[str], tuple[str, str] | None]

#: keys per page: 1000 instances of ~250 bytes are a ~250 KB message
PAGE_KEYS = 1000
#: the channel's receive limit (gRPC's default is 4 MiB); etcd itself sends up to 2 GiB
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
#: largest value decoded: etcd's default --max-request-bytes (1.5 MiB), so with a default
#: server nothing is skipped; a valid instance is far smaller (tens of KB at most)
MAX_VALUE_BYTES = 1536 * 1024
#: how often a read is started again because its revision was compacted under it
MAX_RESTARTS = 3
#: operations per transaction: etcd's default --max-txn-ops is 128
TXN_OPS = 100


class Caller(Protocol):
    """``EtcdRegistry._call``: one request, retried on other members until the timeout."""

    def __call__(self, what: str, fn: Any, closing: bool = False) -> Any: ...


class _Compacted(RegistryError):
    """The revision a paginated read started at was compacted before it finished."""


class _TooBig(RegistryError):
    """A page was larger than the channel's receive limit."""


class _TooManyOps(RegistryError):
    """The cluster allows fewer operations a transaction (--max-txn-ops) than we sent."""


def read_snapshot(call: Caller, client: Any, decode: Decode, root: str, *,
                  page_keys: int = PAGE_KEYS, max_value: int = MAX_VALUE_BYTES,
                  services: Collection[str] | None = None,
                  reads: ReadStats | None = None, denied: Denied | None = None,
                  split: Split | None = None) -> Snapshot:
    """Every valid instance under ``root``, read page by page at one revision; with
    ``services``, only under ``root<service>/`` for each (still at one revision), those etcd
    denies left out, told to ``denied`` and named in the snapshot's ``withheld`` (without
    ``denied``, a denial fails the read). With ``split``, the instances whose value is there
    but skipped (it does not decode, or is too large) are named in ``unreadable``."""
    roots = [root] if services is None else [f"{root}{s}/" for s in sorted(set(services))]
    stats = reads if reads is not None else ReadStats()
    stats.full_read()
    if not roots:
        return _empty(call, client, root)
    withheld: list[str] = []  # the roots etcd denied: told once the read stands
    refused = None if denied is None else withheld.append
    for attempt in range(MAX_RESTARTS + 1):
        try:
            reading = _Reading(decode, split, max_value, stats)  # each attempt anew
            if services is None:
                return _read_once(call, client, reading, root, page_keys, Snapshot(revision=0))
            withheld.clear()
            try:
                snap = _read_many(call, client, reading, roots, page_keys, refused)
            except _TooManyOps as exc:
                log.info("etcd read of %d services, one request each: %s", len(roots), exc)
                withheld.clear()  # read again from the start, at another revision
                reading.unreadable.clear()
                snap = _read_each(call, client, reading, roots, page_keys, refused)
            if denied is not None:
                for one in withheld:
                    denied(one)
            return replace(snap, withheld=frozenset(r[len(root):-1] for r in withheld))
        except _Compacted as exc:
            log.warning("etcd read of %s: %s; reading again (%d/%d)", root, exc, attempt + 1,
                        MAX_RESTARTS)
    raise RegistryError(f"etcd read of {root}: its revision was compacted during each of "
                        f"{MAX_RESTARTS + 1} attempts (is a compaction running in a loop?)")


def _empty(call: Caller, client: Any, root: str) -> Snapshot:
    """No service asked for: nothing, at the current revision (to watch from)."""
    resp = call(f"read {root} (revision)", partial(client.get_response, root.encode()))
    return Snapshot(revision=int(resp.header.revision))


class _Reading:
    """One attempt's decoding: the instances read, and with ``split`` the instances whose
    value is there but skipped (:attr:`Snapshot.unreadable`)."""

    def __init__(self, decode: Decode, split: Split | None, max_value: int,
                 reads: ReadStats) -> None:
        self.decode, self.split, self.max_value, self.reads = decode, split, max_value, reads
        self.unreadable: set[tuple[str, str]] = set()

    def take(self, kvs: Iterable[Any], instances: dict[tuple[str, str], Instance]) -> None:
        """Decode ``kvs`` into ``instances``, skipping (with a warning) a value too large."""
        for kv in kvs:
            self.reads.add(kv.key, kv.value)
            key = kv.key.decode("utf-8", "replace")
            inst = None
            if len(kv.value) > self.max_value:
                log.warning("registry entry %s is %d bytes (more than %d); skipped",
                            shown(key), len(kv.value), self.max_value)
            else:
                inst = self.decode(key, kv.value)
            if inst is not None:
                instances[inst.key] = inst
            else:
                self.skipped(key)

    def skipped(self, key: str) -> None:
        """The value at ``key`` is there but was not taken."""
        split = self.split(key) if self.split is not None else None
        if split is not None:
            self.unreadable.add(split)

    def snapshot(self, instances: dict[tuple[str, str], Instance], revision: int) -> Snapshot:
        return Snapshot(instances=instances, revision=revision,
                        unreadable=frozenset(self.unreadable - instances.keys()))


def _read_once(call: Caller, client: Any, reading: _Reading, root: str, page_keys: int,
               base: Snapshot) -> Snapshot:
    """``base`` plus what is under ``root``, at ``base``'s revision (if it has one)."""
    start, end = root.encode(), prefix_range_end(root.encode())
    revision, limit, pages = base.revision, page_keys, 0
    instances = dict(base.instances)
    while True:
        pages += 1
        try:
            resp = call(f"read {root} (page {pages})",
                        partial(_range, client, start, end, limit, revision))
        except _TooBig as exc:
            if limit > 1:
                limit = max(1, limit // 2)
                log.debug("etcd read of %s: %s; asking %d keys a page", root, exc, limit)
                continue
            resp = call(f"read {root} (key of page {pages})",
                        partial(_range, client, start, end, 1, revision, keys_only=True))
            revision = revision or int(resp.header.revision)
            if not resp.kvs:
                break
            key = resp.kvs[0].key
            reading.reads.add(key, None)
            log.warning("registry entry %s is larger than the gRPC receive limit; skipped",
                        shown(key.decode("utf-8", "replace")))
            reading.skipped(key.decode("utf-8", "replace"))
            start = key + b"\0"
            continue
        revision = revision or int(resp.header.revision)
        reading.take(resp.kvs, instances)
        if not resp.more or not resp.kvs:
            break
        start = resp.kvs[-1].key + b"\0"
        limit = min(page_keys, limit * 2)
    log.debug("etcd read of %s: %d instances in %d pages at revision %d", root,
              len(instances), pages, revision)
    return reading.snapshot(instances, revision)


def _read_each(call: Caller, client: Any, reading: _Reading, roots: list[str], page_keys: int,
               denied: Denied | None) -> Snapshot:
    """Each of ``roots`` in requests of its own, at one revision (a cluster that allows fewer
    operations a transaction than :func:`_read_many` sends); one etcd denies is told to
    ``denied`` and left out (raised without ``denied``, or when every one is denied)."""
    snap, denial = Snapshot(revision=0), None
    for one in roots:
        try:
            snap = _read_once(call, client, reading, one, page_keys, snap)
        except RegistryDenied as exc:
            if denied is None:
                raise
            denial = exc
            denied(one)
    if denial is not None and not snap.revision:  # nothing read: every one denied
        raise denial
    return snap


def _read_many(call: Caller, client: Any, reading: _Reading, roots: list[str], page_keys: int,
               denied: Denied | None = None) -> Snapshot:
    """Every valid instance under each of ``roots``, at one revision, in few requests: how
    many keys each holds (``TXN_OPS`` counts a request), then those that hold any, packed
    into transactions of at most ``page_keys`` keys. A root of more keys is paged on its
    own (:func:`_read_once`), as is each root of a transaction whose answer was too large."""
    counts: dict[str, int] = {}
    revision = 0

    def count(group: list[str]) -> None:
        nonlocal revision
        resp = call(f"count the keys of {len(group)} services",
                    partial(_txn, client, group, revision, count_only=True))
        revision = revision or int(resp.header.revision)
        for one, answer in zip(group, resp.responses, strict=True):
            counts[one] = int(answer.response_range.count)

    denial: RegistryDenied | None = None  # the last etcd answered

    def count_apart(group: list[str], depth: int = 0) -> None:
        """``group`` counted; one root etcd denies fails the whole transaction, so then each
        half apart, three times (one denied of 100: 20 requests, not 101), then each root
        alone (every one denied: 115, not 199 halving down to each)."""
        nonlocal denial
        try:
            count(group)
        except RegistryDenied as exc:
            if denied is None:
                raise
            if len(group) == 1:
                denial = exc
                denied(group[0])
            else:
                halves = ([group[:len(group) // 2], group[len(group) // 2:]] if depth < 3
                          else [[one] for one in group])
                for part in halves:
                    count_apart(part, depth + 1)

    for start in range(0, len(roots), TXN_OPS):
        count_apart(roots[start:start + TXN_OPS])
    if denial is not None and not counts:  # nothing counted: every one denied
        raise denial
    instances: dict[tuple[str, str], Instance] = {}
    for pack in _packs([(r, n) for r, n in counts.items() if n], page_keys):
        if len(pack) > 1 or counts[pack[0]] <= page_keys:
            try:
                resp = call(f"read {len(pack)} services", partial(_txn, client, pack, revision))
            except _TooBig as exc:
                log.debug("etcd read of %d services: %s; one at a time", len(pack), exc)
            else:
                for answer in resp.responses:
                    reading.take(answer.response_range.kvs, instances)
                continue
        for one in pack:
            instances.update(_read_once(call, client, reading, one, page_keys,
                                        Snapshot(revision=revision)).instances)
    return reading.snapshot(instances, revision)


def _packs(counts: list[tuple[str, int]], page_keys: int) -> Iterator[list[str]]:
    """``counts``' roots in order, grouped up to ``page_keys`` keys and ``TXN_OPS`` roots a
    group; a root of more than ``page_keys`` keys is a group of its own."""
    for pack in packs(counts, lambda count: count[1], TXN_OPS, page_keys):
        yield [root for root, _ in pack]


def _txn(client: Any, roots: list[str], revision: int, count_only: bool = False) -> Any:
    """One transaction of a range read of each of ``roots``, at ``revision`` (0: now)."""
    ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
        key=r.encode(), range_end=prefix_range_end(r.encode()), revision=revision,
        count_only=count_only)) for r in roots]
    with _errors(revision, f"{len(roots)} ranges"):
        return client.txn_response(etcdrpc.TxnRequest(success=ops))


def _range(client: Any, start: bytes, end: bytes, limit: int, revision: int,
           keys_only: bool = False) -> Any:
    """One page. The compaction and size errors become ours; the rest go to the caller."""
    with _errors(revision, f"{limit} keys"):
        return client.get_range_response(start, end, limit=limit, revision=revision or None,
                                         keys_only=keys_only)


@contextmanager
def _errors(revision: int, asked: str) -> Iterator[None]:
    """A read's compaction, size and transaction-size errors as ours; the rest unchanged."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = str(exc.details() if hasattr(exc, "details") else exc)
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            raise _Compacted(f"revision {revision} compacted") from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            raise _TooBig(f"{asked}: {details}") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT and "too many operations" in details:
            raise _TooManyOps(details) from None
        raise
