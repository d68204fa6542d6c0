"""etcd v3 backend: one lease per registry object, renewed (jittered) on one keepalive stream
(``etcd_keepalive``; it and the watch streams run on an asyncio loop, ``etcd_aio``). A failed
renewal is one short attempt, tried again about one renewal interval later (sooner as the lease
runs out, ±50 %): a fleet whose registry restarts does not renew in its first second. A new
lease or a rewrite etcd refuses waits 0.8 s, doubling to 30 s (``KeeperWaits``). Watches resume
from the last revision seen, or send a ``reset`` when it was compacted (``etcd_watch``). Each
instance is written with its per-node index key (``etcd_index``): :meth:`EtcdRegistry.
node_snapshot` reads one node's entries only. A watch-only registry reads one key a TTL
(``etcd_pulse``); own keys no watch follows are watched alone (``etcd_own``). TLS: ``security``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, TypeVar

import grpc
from pyetcd import exceptions as etcd_exc

from discovery.errors import ConfigError, RegistryDenied, RegistryError, RegistryUnavailable
from discovery.model import Instance, id_node
from discovery.registry import base, etcd_aio, etcd_index, etcd_rewind
from discovery.registry.base import ChangeCallback, Snapshot, StateCallback
from discovery.registry.decoder import Decoder
from discovery.registry.etcd_aio import LoopThread
from discovery.registry.etcd_keepalive import KeepAliveStream, KeeperWaits
from discovery.registry.etcd_own import own_hint, own_keys
from discovery.registry.etcd_pulse import pulse, read_alive, status
from discovery.registry.etcd_read import read_snapshot
from discovery.registry.etcd_state import StateBoard
from discovery.registry.etcd_watch import EtcdWatch
from discovery.registry.owned import Restorer, claiming
from discovery.registry.reads import ReadStats
from discovery.registry.security import (
    EtcdAuth,
    etcd_channel_credentials,
    load_secrets,
    rpc_details,
)
from discovery.registry.ttl import ETCD_SHORTEST, GrantedTtl
from discovery.registry.url import RegistryURL
from discovery.retry import jittered

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the longest pause between two tries of a request (± half): under ENDPOINT_RETRY, or the next asks
#: the member that just failed again (a SIGKILLed one held every try while two could answer)
_PAUSE_MAX = etcd_aio.ENDPOINT_RETRY / 2
_RENEW_PATIENCE = 0.5  # seconds one renewal attempt tries the members (then: the next later)


class _LeaseGone(RegistryError):
    """etcd does not know our lease any more (it expired)."""


class EtcdRegistry:
    """The :class:`~discovery.registry.base.Registry` on etcd v3. See the module docstring."""

    def __init__(self, url: RegistryURL, ttl: float = 10.0, timeout: float = 5.0,
                 loop: LoopThread | None = None) -> None:
        if url.scheme != "etcd":
            raise ConfigError(f"registry URL {url}: not an etcd:// URL")
        self.url, self.ttl, self.timeout = url, ttl, timeout
        self.decoder = Decoder(url)
        self.reads = ReadStats()
        self.where = ",".join(f"{h}:{p}" for h, p in url.hosts)
        secrets = load_secrets(url)
        creds = etcd_channel_credentials(secrets) if url.tls else None
        # Per-RPC deadline: a hung member is left for another in time. No user/password here
        # (EtcdAuth authenticates lazily). One asyncio channel a member, on the loop given or ours
        self.channels = etcd_aio.AioChannels()
        self.client = etcd_aio.Client(
            endpoints=etcd_aio.endpoints(url.hosts, url.tls, creds),
            timeout=min(timeout, max(1.0, ttl / 3)), failover=True,
            channels=self.channels, loop=lambda: self.loop)
        self.auth = EtcdAuth(self.client, secrets, self.where)
        self._put = partial(etcd_index.put, self._call, self.client, self.url)  # (inst, lease)
        self._granted = GrantedTtl("etcd", self.where, "leases", ETCD_SHORTEST)
        self._lock = threading.RLock()  # owned, lease, watches
        self._owned: dict[tuple[str, str], Instance] = {}
        self._lease: int | None = None
        self._need_reput, self._rewritten = False, set[tuple[str, str]]()  # (put_all's done)
        self._watches: list[EtcdWatch] = []
        self._cluster = etcd_rewind.ClusterSeen()  # who answered our reads
        self._nodes: dict[tuple[str, str], str] = {}  # key -> node, from node_snapshot
        self._closing, self._closed = threading.Event(), threading.Event()
        self._keeper: etcd_aio.LoopTask | None = None  # the lease's, on the loop
        self._pulse: etcd_aio.LoopTask | None = None  # a watch-only registry's (etcd_pulse)
        self._loop, self._own_loop, self._loop_lock = loop, loop is None, threading.Lock()
        self._interval = max(ttl / 3, 0.2)  # between renewals (jittered)
        self._waits = KeeperWaits(ttl, self._interval)  # the keeper's, after a failed round
        self._state = StateBoard(self.where, lambda: self._waits.back(),
                                 lambda: self._lease is not None)
        self._restorer = Restorer(self._owned, self._restore, url.resume_spread, "etcd",
                                  recheck=2 * timeout)
        self._restorer.own = own_keys(self, self._restorer.wrap, self._followed)  # etcd_own
        self._renewals = KeepAliveStream(self.client, self.channels, lambda: self.loop,
                                         late_wait=self._interval + 1.0,
                                         hint=lambda: own_hint(url, self._restorer.own))

    @property
    def loop(self) -> LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = LoopThread()
            return self._loop

    @property
    def invalid_records(self) -> int:
        return self.decoder.skipped

    def _call(self, what: str, fn: Callable[[], T], closing: bool = False,
              patience: float | None = None, login: bool = True) -> T:
        """Run one etcd request, retrying transient failures (other endpoints) until timeout (or
        ``patience`` s); not ``login``: no login first unless etcd asks (a renewal: see _keep)."""
        started = time.monotonic()
        deadline = started + (self.timeout if patience is None else patience)
        delay, reauthenticated = jittered(0.05, 0.5), False  # ± half: a fleet out of step
        failure: Exception | None = None  # the last answer that says why (for the error)
        while True:
            if self._closed.is_set() or (self._closing.is_set() and not closing):
                raise RegistryError(f"etcd registry {self.url} is closed")
            try:
                if login or reauthenticated:
                    self.auth.ensure()
                result = fn()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code == grpc.StatusCode.NOT_FOUND and "lease" in str(details):
                    raise _LeaseGone() from None
                if not reauthenticated and self.auth.stale(exc):
                    reauthenticated = True  # etcd forgot our token (restart, idle TTL)
                    continue
                if not etcd_aio.timed_out_in_server(code, details):
                    raise (RegistryDenied if code == grpc.StatusCode.PERMISSION_DENIED
                           else RegistryError)(
                        f"etcd at {self.where}: {what} failed: {rpc_details(exc)}") from None
                failure = exc
            except etcd_aio.TRANSIENT as exc:
                # "no endpoint available": the failure before it says why (TLS, refused...)
                if failure is None or not isinstance(exc, etcd_exc.NoServerAvailableError):
                    failure = exc
            except (etcd_exc.Etcd3Exception, ValueError) as exc:
                raise RegistryError(f"etcd at {self.where}: {what} failed: {exc!r}") from None
            else:
                self.set_state(True)
                return result
            if time.monotonic() + delay >= deadline:
                self.set_state(False)
                raise RegistryUnavailable(
                    f"etcd at {self.where}: {what} failed, no member answered within "
                    f"{deadline - started:.3g}s ({rpc_details(failure)})") from None
            (self._closed if closing else self._closing).wait(delay)
            delay = jittered(min(delay * 2, _PAUSE_MAX), 0.5)

    def set_state(self, up: bool) -> None:
        self._state.set(up)

    def _restore(self, key: tuple[str, str], doubt: bool) -> str:
        """``key`` (owned, changed or deleted by another writer) put back if still so, under
        the lock (no deregister sees it undone); ``doubt`` (an answer lost): deleted if no longer
        owned but on our lease. A lease gone or a rewrite: the keeper's; unsettled: the agent's."""
        with self._lock:  # (claiming marks a key unsettled under it)
            inst, lease = self._owned.get(key), self._lease
            if (lease is None or self._need_reput or self._closing.is_set()
                    or key in self._restorer.unsettled):
                self._rewritten.discard(key)  # (a rewrite under way: written again, not skipped)
                return ""
            if inst is None:
                if doubt:
                    etcd_index.drop_late(self._call, self.client, self.url, key, lease)
                return ""
            try:
                return etcd_index.write_back(self._call, self.client, self.url, inst, lease,
                                             self.decoder.decode, self._restorer.same)
            except _LeaseGone:
                self._renew_lease(lease)  # a new lease; everything written again
                return ""

    # -- lease ------------------------------------------------------------------------------

    def _ensure_lease(self) -> int:
        with self._lock:
            if self._closing.is_set():
                raise RegistryError(f"etcd registry {self.url} is closed")
            if self._lease is None:
                ttl = max(1, math.ceil(self.ttl))
                lease = self._call("grant lease", lambda: self.client.lease(ttl))
                self._lease = lease.id
                self._granted.check(lease.ttl, ttl)
                self._waits.back()  # granted: a rewrite the keeper was refused goes on soon
            if self._keeper is None:
                self._keeper = self.loop.start(self._keep())
            return self._lease

    def _renew_lease(self, old: int) -> None:
        """Our lease expired: grant a new one and write every owned instance again."""
        with self._lock:
            if self._lease != old or self._closing.is_set():
                return
            self._lease = None
            self._need_reput, self._rewritten = True, set()  # every owned instance again
            lease = self._ensure_lease()
            log.warning("etcd lease %x expired; re-registering %d instance(s) under lease %x",
                        old, len(self._owned), lease)
            self._reput_all()

    def _reput_all(self) -> None:
        with self._lock:  # a keeper round that saw _need_reput before another's rewrite: none
            lease = self._lease
            if lease is None or self._closing.is_set() or not self._need_reput:
                return
            self._need_reput = True  # until this round writes everything: the keeper retries
            etcd_index.put_all(lambda i: self._put(i, lease), self._owned.values(), self._rewritten)
            self._need_reput = False

    def members_in_use(self) -> set[str]:
        """The members the calls and the streams use now (the channels to keep)."""
        used = [self.client.endpoint_in_use, self._renewals.endpoint,
                *(w.endpoint for w in list(self._watches))]
        return {e.netloc for e in used if e is not None}

    async def _keep(self) -> None:
        """The lease's keeper, one task on the loop: every renewal interval (jittered, so a
        fleet's renewals do not align) one keepalive on the stream, with no login (etcd takes it
        without a token: a rotated password must not cost a fleet its leases, nor a fleet's
        re-login delay its renewals); anything else (a failure, the lease gone, instances to
        write again, the state to tell listeners) is one round of :meth:`_keep_round` in the
        loop's executor."""
        interval = self._interval
        wait, renewed = jittered(interval), time.monotonic()
        while True:
            await self._waits.sleep(wait)
            if self._closing.is_set():
                return
            await self.channels.prune(self.members_in_use())  # what a failover left
            lease, answer = self._lease, None
            if lease is not None and not self._need_reput and self._state.up:
                with contextlib.suppress(Exception):  # the round below tries again
                    answer = await self._renewals.renew_async(lease)
                if answer and answer[0].TTL > 0:
                    wait, renewed = jittered(interval), time.monotonic()
                    continue
            round_ = asyncio.ensure_future(asyncio.to_thread(
                self._keep_round, interval, wait, renewed, (lease, answer)))
            try:
                wait, renewed = await asyncio.shield(round_)
            except asyncio.CancelledError:  # closing: let the round in flight finish
                await asyncio.wait([round_])
                raise

    def _keep_round(self, interval: float, wait: float, renewed: float,
                    tried: tuple[int | None, list[Any] | None]) -> tuple[float, float]:
        """One round of the keeper with every retry and wait of ``_call`` (a thread of the
        loop's executor): renew (or use the answer of the keepalive ``tried``, if it was for
        the lease we hold now), grant a new lease if it is gone, write the instances again if
        needed (once refused: when ``_waits`` says it is due). Returns the wait until the
        next round and when the lease was last renewed."""
        lease = self._lease
        answer = tried[1] if tried[0] == lease else None
        failure: RegistryError | None = None
        try:
            try:
                if lease is not None:
                    resp = answer if answer is not None else self._call("lease keepalive",
                        lambda: self._renewals.renew(lease), patience=_RENEW_PATIENCE, login=False)
                    if not resp or resp[0].TTL <= 0:  # etcd's word that the lease is gone
                        self._renew_lease(lease)
                    else:
                        renewed = time.monotonic()
                if self._need_reput and self._waits.due():  # a new lease or a rewrite to finish
                    self._ensure_lease()
                    self._reput_all()
            except _LeaseGone:
                self._renew_lease(lease)  # type: ignore[arg-type]
        except RegistryError as exc:
            if self._closing.is_set():
                return wait, renewed
            failure = exc
        except Exception:
            log.exception("etcd lease keepalive failed")
            return jittered(interval), renewed
        leased = self._lease is not None  # after a failure: link down, soon; refused, later
        renewed = time.monotonic() if leased and self._lease != lease else renewed  # new lease
        return self._waits.after(failure, renewed, leased, self._need_reput), renewed

    # -- the Registry interface -------------------------------------------------------------

    def register(self, instance: Instance) -> None:
        with claiming(self._owned, self._lock, instance, self._restorer.unsettled):
            for _ in range(3):
                lease = self._ensure_lease()
                try:
                    self._put(instance, lease)
                    break
                except _LeaseGone:
                    self._renew_lease(lease)
            else:
                raise RegistryError(f"etcd at {self.where}: lease keeps expiring")
        self._restorer.watch_own()

    def deregister(self, service: str, instance_id: str) -> None:
        with self._lock:
            owned = self._owned.pop((service, instance_id), None)
            self._restorer.unsettled.discard((service, instance_id))
            node = owned.node if owned else self._nodes.pop((service, instance_id), None)
        self._restorer.watch_own()
        node = node or id_node(instance_id)
        etcd_index.delete(self._call, self.client, self.url, service, instance_id, node)

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        """Paginated at one revision: see :mod:`discovery.registry.etcd_read`."""
        return read_snapshot(self._call, self.client, self.decoder.decode,
                             f"{self.url.services_root}/", services=services, reads=self.reads,
                             denied=self.decoder.denied, split=self.url.split_key)

    def node_snapshot(self, node: str) -> Snapshot:
        """``node``'s instances through its index (keys deleted from it put back): etcd_index."""
        self._restorer.watch_own()
        with self._lock:  # (before the read: one registered after it is not taken as lacking)
            lease = None if self._need_reput else self._lease  # (a rewrite: the keeper's)
            owned = [i for k, i in self._owned.items() if k not in self._restorer.unsettled]
        snap, _ = etcd_rewind.checked(list(self._watches), lambda: etcd_index.read_node(
            self._call, self.client, self.url, self.decoder.decode, node, self.reads),
            lambda answer: answer[1], self._cluster)
        with self._lock:
            self._nodes.update(dict.fromkeys(snap.instances, node))
        return snap if lease is None else etcd_index.reindex(self._call, self.client, self.url,
            snap, node, owned, lease, self.decoder.decode, self._restorer.same, self.reads)

    def watch(self, callback: ChangeCallback, start_revision: int = 0,
              services: Collection[str] | None = None) -> EtcdWatch:
        callback = self._restorer.wrap(callback, services)
        start_revision = base.read_first(start_revision, lambda: self.snapshot(services), callback)
        with self._lock:
            if self._closing.is_set():
                raise RegistryError(f"etcd registry {self.url} is closed")
            w = self._followed(EtcdWatch(self, callback, start_revision, services,
                                         self.url.resume_spread))
            self._restorer.followed(services, w._stopped)
            if self._pulse is None:
                self._pulse = self.loop.start(pulse(
                    max(self.ttl, 1.0), lambda: self._lease is None, self._pulse_read))
        return w

    def _followed(self, w: EtcdWatch) -> EtcdWatch:
        """``w`` among the watches (rewind checks, channels in use); those stopped let go."""
        with self._lock:
            self._watches = [*(x for x in self._watches if not x._stopped.is_set()), w]
        return w

    def _read_alive(self) -> Any:  # (etcd_pulse)
        return read_alive(self.client, self.url.prefix, list(self._watches), self._cluster)

    def _pulse_read(self) -> None:
        """A watch-only registry's pulse (one task): a liveness read, then a member's Status."""
        self._call("liveness read", self._read_alive)
        status(self.client, list(self._watches), self._cluster)

    def revision(self) -> int:
        """etcd's current revision (a linearizable read: a member answers once caught up)."""
        return int(self._call("revision read", self._read_alive).header.revision)

    def add_state_listener(self, callback: StateCallback) -> None:
        self._state.add(callback)

    def close(self, revoke: bool = True) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            lease, watches, keeper = self._lease, list(self._watches), self._keeper
            self._watches.clear()
        self._renewals.close()
        self._restorer.close()
        try:
            for w in watches:
                w.stop()
            if self._pulse is not None:
                self._pulse.stop(self.timeout + 1)
            if keeper is not None:  # its round in flight ends first (it sees we are closing)
                keeper.stop(self.timeout + 1)
            if revoke and lease is not None:
                try:
                    self._call("revoke lease", lambda: self.client.revoke_lease(lease), True)
                except RegistryError as exc:  # not _LeaseGone: expired, or revoked by a first
                    if not isinstance(exc, _LeaseGone):  # try that timed out
                        log.warning("%s; our entries expire within %gs instead", exc, self.ttl)
        finally:
            self._closed.set()
            self.channels.close_on(self._loop, self.timeout, own_loop=self._own_loop)
            self.client.close()
