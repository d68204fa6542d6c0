"""ZooKeeper backend (kazoo): instances are EPHEMERAL nodes of this object's session.

The session timeout is the TTL. After a session expiry every owned node is created again and
every watch sends a ``reset`` (one made meanwhile too); after a connection loss kazoo resumes
the session (:mod:`~discovery.registry.zk_watch` re-arms its watches): nothing is lost.
``Snapshot.revision`` is a zxid. With a user and password our nodes' ACL is ``digest:<user>``
ALL + ``world:anyone`` READ (docs/security.md); ``?format=nerve``: Nerve's nodes (zk_nerve).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError

from discovery.errors import ConfigError, RegistryDenied, RegistryError, RegistryUnavailable
from discovery.model import Instance
from discovery.model.instance import made_on
from discovery.registry.base import FIRST_READ, ChangeCallback, Snapshot, StateCallback
from discovery.registry.decoder import Decoder
from discovery.registry.owned import Restorer, claiming, unread
from discovery.registry.readback import wire_of
from discovery.registry.reads import ReadStats
from discovery.registry.security import load_secrets, tls_context, tls_probe, zk_client_options
from discovery.registry.url import RegistryURL
from discovery.registry.zk_claim import ZkClaims
from discovery.registry.zk_index import ZkNodeIndex
from discovery.registry.zk_io import PollingHandler, PreReads, fewer_syscalls
from discovery.registry.zk_multi import ManyReads
from discovery.registry.zk_nerve import NerveNodes
from discovery.registry.zk_own import OwnNodes
from discovery.registry.zk_persistent import EventRouter
from discovery.registry.zk_rewind import ensemble_behind
from discovery.registry.zk_scan import full_read
from discovery.registry.zk_session import SessionTimeout, leave
from discovery.registry.zk_watch import ZkWatch
from discovery.retry import backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
_TRANSIENT = (ConnectionLoss, SessionExpiredError, KazooTimeoutError)


class ZkRegistry:
    """The :class:`~discovery.registry.base.Registry` on ZooKeeper. See the module docstring."""

    def __init__(self, url: RegistryURL, ttl: float = 10.0, timeout: float = 5.0) -> None:
        if url.scheme != "zk":
            raise ConfigError(f"registry URL {url}: not a zk:// URL")
        self.url, self.ttl, self.timeout = url, ttl, timeout
        self.decoder = Decoder(url)
        self.reads = ReadStats()
        self._where = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in url.hosts)
        options = zk_client_options(url, load_secrets(url))
        self._acl = options.get("default_acl")
        options.setdefault("handler", PollingHandler())
        self.client = KazooClient(hosts=self._where, timeout=ttl, **options)
        self._session = SessionTimeout(ttl, self._where)  # what the ensemble grants
        self._session.install(self.client, url)  # and the reconnect policy that follows it
        fewer_syscalls(self.client)
        self._router = EventRouter(self.client)
        self._pre = PreReads(self.client, lambda: self._session.write_timeout(len(url.hosts)))
        self._many = ManyReads(self.client, self._get, self.decoder)
        self._index = ZkNodeIndex(self.client, url, self._get, self.decoder, self.reads,
                                  self._many, lambda k, seen: self._restorer.as_written(k, seen))
        self._nerve = (NerveNodes(self.client, url, self._get, self._index.named)
                       if url.nerve else None)
        self._nerve_read: set[str] = set()  # nodes whose index was empty once (see below)
        self._claims = ZkClaims(self.client, url, self._get, self._index, self._nerve,
                                self._acl, self._where)
        self._lock = threading.RLock()
        #: a session recovery's write, a register and a deregister, one at a time: else a
        #: recovery's write of an instance in flight would undo its deregister (or register)
        self._writes = threading.Lock()
        self._owned: dict[tuple[str, str], Instance] = {}
        self._restorer = Restorer(self._owned, self._restore, url.resume_spread, "zk",
                                  recheck=2 * timeout, wire=wire_of(url),
                                  many=self._restore_many)
        self._watches: list[ZkWatch] = []
        self._recoveries = 0  # sessions recovered (their watches reset) so far
        self._own = OwnNodes(self.client, self._claims.path_of, self.decoder.decode,
                             self._restorer.wrap(unread), timeout, url.resume_spread)  # zk_own
        if url.own_watch == "off":  # the agent's reconcile alone: no watch, no listener
            self._own.close()
        self._restorer.own = None if url.own_watch == "off" else self._own
        self._listeners: list[StateCallback] = []
        self._connected = threading.Event()
        self._down_since: float | None = time.monotonic()  # not connected since (None: it is)
        self._tls = tls_context(url) if url.tls else None  # for srvr (zk_rewind)
        self._lost = False
        self._closing = threading.Event()
        self._events: queue.Queue[bool | None] = queue.Queue()
        self._recovery = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True, name=f"zk-registry-{n}")
                         for f, n in ((self._event_loop, "state"), (self._recover_loop, "recover"))]
        for t in self._threads:
            t.start()
        self.client.add_listener(self._on_state)
        self.client.start_async()

    # -- plumbing ---------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        """kazoo's listener (its connection thread): only record and hand over."""
        if state == KazooState.CONNECTED:
            self._connected.set()
            self._down_since = None
            if self._lost:
                self._lost = False
                self._recovery.set()
            self._events.put(True)
        else:
            self._connected.clear()
            if self._down_since is None:
                self._down_since = time.monotonic()
            if state == KazooState.LOST:
                self._lost = True
            self._events.put(False)

    def _event_loop(self) -> None:
        """Tells the state listeners, in order, outside kazoo's thread."""
        up: bool | None = None
        while (value := self._events.get()) is not None:
            if value == up:
                continue
            up = value
            level = logging.INFO if value or self._closing.is_set() else logging.WARNING
            log.log(level, "ZooKeeper at %s %s", self._where,
                    "connected" if value else "connection lost")
            for cb in list(self._listeners):
                try:
                    cb(value)
                except Exception:
                    log.exception("registry state listener failed")

    def _recover_loop(self) -> None:
        while not self._closing.is_set():
            woken = self._recovery.wait(self._session.seconds)  # close() sets it too
            if self._closing.is_set():
                return
            try:
                if woken:
                    self._recovery.clear()
                    self._recover()
                else:
                    self._check_behind()
            except Exception:
                log.exception("ZooKeeper session recovery failed")

    def _check_behind(self) -> None:
        """Disconnected for a session timeout or more from an ensemble behind the zxid we saw
        (``zk_rewind``), which never takes our session back: ask for it from zxid 0 (one that
        lost it says it expired), then all is registered and read again, as after an expiry."""
        down, zxid = self._down_since, self.client.last_zxid
        if (down is None or time.monotonic() - down < self._session.seconds or not zxid
                or not ensemble_behind(self.url.hosts, zxid, tls=self._tls)):
            return
        log.warning("ZooKeeper at %s is behind zxid %#x seen here (restored from a backup, "
                    "or its data lost): starting over with a new session", self._where, zxid)
        self._lost = True
        self.client.last_zxid = 0

    def _recover(self) -> None:
        """New session after an expiry: create our nodes again, tell watches to reset. One
        that cannot be (its service directory locked against us) is logged and retried alone
        until written, deregistered or replaced (by the agent's next reconcile), or closing."""
        with self._lock:
            watches, owned = list(self._watches), list(self._owned.values())
            self._recoveries += 1  # a watch made meanwhile resets itself (watch())
        for w in watches:
            w.reset()
        log.warning("ZooKeeper session expired; re-registering %d instance(s)", len(owned))
        # a fleet whose sessions expired together retries apart: growing, jittered waits; a
        # newer expiry (its own round) or close() ends them (both set _recovery)
        retrying = backoff(RegistryError, stop_event=self._recovery, initial=0.5, maximum=2.0,
                           jitter=0.5, what="re-registering after session expiry", logger=log)
        failed: list[Instance] = []
        zxid = self.client.last_zxid
        with contextlib.suppress(RegistryError):  # raised again only once stopped
            for attempt in retrying:
                with attempt:
                    with self._writes:
                        with self._lock:  # not one deregistered or replaced meanwhile
                            owned = [i for i in owned if self._owned.get(i.key) is i]
                        if not owned or self._recovery.is_set():  # a newer expiry: its own round
                            return
                        left = self._op(f"re-register {len(owned)} instance(s)",
                                        functools.partial(self._claims.claim_together, owned))
                        zxid = self.client.last_zxid  # (its answer's)
                    failed = [inst for inst in left if not self._reclaim(inst)]
        self._own.rearm(zxid)  # zk_own: one SetWatches (those still refused fire: gone)
        if not failed:
            return
        # refused on their own (a service directory locked against us): alone, the wait
        # growing to 30 s, so one refused for good is named twice a minute, not every 2 s
        refused = backoff(RegistryError, stop_event=self._recovery, initial=1.0, maximum=30.0,
                          jitter=0.5, what="re-registering refused instance(s)", logger=log)
        with contextlib.suppress(RegistryError):
            for attempt in refused:
                with attempt:
                    failed = [inst for inst in failed if not self._reclaim(inst)]
                    if failed:
                        raise RegistryError(f"{len(failed)} instance(s) still refused")

    def _reclaim(self, inst: Instance) -> bool:
        """One instance of a recovery round, alone; False if it failed (logged)."""
        try:
            with self._writes:
                with self._lock:
                    if self._owned.get(inst.key) is not inst:
                        return True  # deregistered or replaced meanwhile
                self._op(f"re-register {inst.service}/{inst.id}",
                         functools.partial(self._claims.claim, inst))
        except RegistryError as exc:
            if self._closing.is_set():
                raise
            log.warning("after the session expiry: %s", exc)
            return False
        self._restorer.watch_own()  # (Nerve's layout: a new node, watched)
        return True

    def _op(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` once connected, retrying connection loss until ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self._closing.is_set():
                raise RegistryError(f"ZooKeeper registry {self.url} is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._connected.wait(remaining):
                why = tls_probe(self.url) if self.url.tls else ""
                raise RegistryUnavailable(f"ZooKeeper at {self._where}: {what} failed, "
                                          f"not connected within {self.timeout:g}s{why}")
            try:
                return fn()
            except _TRANSIENT as exc:
                if time.monotonic() + 0.05 >= deadline:
                    raise RegistryUnavailable(f"ZooKeeper at {self._where}: {what} failed: "
                                              f"{type(exc).__name__}") from None
                time.sleep(0.05)
            except ConnectionClosedError:
                raise RegistryError(f"ZooKeeper registry {self.url} is closed") from None
            except NoAuthError:
                who = (f"user {self.url.user!r} is not allowed: the node or its parent was "
                       "created by another identity (user or password)" if self._acl else
                       "the nodes are protected by ACLs: give the registry user and password")
                raise RegistryDenied(f"ZooKeeper at {self._where}: {what} refused (NoAuth): "
                                     f"{who}") from None
            except KazooException as exc:
                raise RegistryError(f"ZooKeeper at {self._where}: {what} failed: "
                                    f"{type(exc).__name__} {exc}") from None

    def _get(self, result: Any) -> Any:
        return result.get(timeout=self.timeout)

    # -- the Registry interface -------------------------------------------------------------

    def register(self, instance: Instance) -> None:
        with self._writes, claiming(self._owned, self._lock, instance,  # see __init__
                                    self._restorer.unsettled):
            self._op(f"register {instance.service}/{instance.id}",
                     lambda: self._claims.claim(instance))
        self._restorer.watch_own()

    def deregister(self, service: str, instance_id: str) -> None:
        with self._writes:  # after a recovery's write in flight (see __init__)
            self._deregister(service, instance_id)

    def _restore(self, key: tuple[str, str], _doubt: bool) -> str:
        return self._restore_many([key]).get(key, "")

    def _restore_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """``keys`` (seen deleted or changed by another writer: ``owned``) written again if still
        ours and settled (:meth:`ZkClaims.restore_many`), under ``_writes`` (see __init__: one
        session's requests apply in order, so no late answer lands after a deregister)."""
        with self._writes:
            with self._lock:
                insts = [i for k in keys if k not in self._restorer.unsettled
                         and (i := self._owned.get(k)) is not None]
            done = self._op(f"write back {len(insts)} instance(s)", functools.partial(
                self._claims.restore_many, insts, self.decoder.decode, self._restorer.same)
            ) if insts else {}
        if insts and self._nerve is not None:  # a new node, maybe (an answer lost, the call
            self._restorer.watch_own()  # tried again, says "" of what landed the first time)
        return done

    def _deregister(self, service: str, instance_id: str) -> None:
        with self._lock:
            owned = self._owned.pop((service, instance_id), None)
            self._restorer.unsettled.discard((service, instance_id))
            self._claims.written.pop((service, instance_id), None)
        self._restorer.watch_own()
        node = self._index.node_of((service, instance_id), owned)

        def delete() -> None:
            key = (service, instance_id)
            if self._nerve is not None:  # its nodes (found through the index), then the index
                self._nerve.delete(key, node)
                self._index.delete(node, key)
                return
            self._claims.remove(key, node)

        self._op(f"deregister {service}/{instance_id}", delete)

    def snapshot(self, services: Collection[str] | None = None,
                 ours: Callable[[str], bool] | None = None) -> Snapshot:
        return self._op("read", functools.partial(
            full_read, self.client, self.url, self._many, self.decoder, self.reads, self._get,
            services, ours, self._read_by))

    def _read_by(self, path: str) -> tuple[str, str] | None:  # as a running watch read it
        return next((k for w in list(self._watches) if (k := w.holds(path))), None)

    def node_snapshot(self, node: str) -> Snapshot:
        """``node``'s instances through its index (``zk_index``). With Nerve's layout a node's
        first read also lists every service and reads the nodes its agent names (``made_on``):
        the index may miss some (written by a version before it, or by a predecessor that died
        between the two creates); a restarted agent adopts them, older nodes found beside."""
        self._restorer.watch_own()
        indexed: set[tuple[str, str]] = set()
        if self._index.enabled:
            snap = self._op(f"read node {node}", functools.partial(self._index.read, node))
            if snap is not None and (self._nerve is None or node in self._nerve_read):
                return snap
            indexed = set(snap.instances) if snap is not None else indexed
        full = self.snapshot(ours=made_on(node))  # the fleet's names, our nodes' data
        self._nerve_read.add(node)  # once it was read (a read that failed: again next time)
        mine = {k: i for k, i in full.instances.items() if i.node == node}
        if self._nerve is not None:
            self._nerve.unindexed(k for k in mine if k not in indexed)
        return Snapshot(mine, full.revision)

    def watch(self, callback: ChangeCallback, start_revision: int = 0,
              services: Collection[str] | None = None) -> ZkWatch:
        if self._closing.is_set():
            raise RegistryError(f"ZooKeeper registry {self.url} is closed")
        make = functools.partial(ZkWatch, self.client, self.decoder, self._connected,
                                 self._restorer.wrap(callback, services), start_revision,
                                 services, self.reads, self._router, self._many, self._pre,
                                 self._read_by, self._restorer.lost)
        recoveries = self._recoveries
        w = self._op("read", make) if start_revision == FIRST_READ else make()  # (base.py)
        with self._lock:
            closing = self._closing.is_set()
            if not closing:  # those stopped (a client following more services) let go
                self._watches = [*(x for x in self._watches if not x._stopped.is_set()), w]
                self._restorer.followed(services, w._stopped)
            missed = recoveries != self._recoveries  # its watches may be the old session's
        if closing:
            w.stop()
            raise RegistryError(f"ZooKeeper registry {self.url} is closed")
        if missed:
            w.reset()
        return w

    @property
    def invalid_records(self) -> int:
        return self.decoder.skipped

    def add_state_listener(self, callback: StateCallback) -> None:
        self._listeners.append(callback)

    def close(self, revoke: bool = True) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            watches, owned, self._watches = list(self._watches), list(self._owned), []
        self._restorer.close()
        for w in watches:
            w.stop(join=False)
        try:
            if revoke or not owned:
                self.client.stop()  # ends the session: its ephemeral nodes (ours only) go
            else:  # left for a successor: they live until the session times out
                leave(self.client)
        except KazooException as exc:
            log.warning("ZooKeeper at %s: closing the session: %s", self._where, exc)
        finally:
            self.client.close()
            for w in watches:
                w.stop()
            self._events.put(None)
            self._recovery.set()  # wakes the recovery thread, which sees _closing and ends
            for t in self._threads:
                t.join(2)
