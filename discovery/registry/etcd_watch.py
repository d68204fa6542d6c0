"""Following an etcd registry: one gRPC watch stream, one etcd watcher per key range.

Without a service filter the stream holds one watcher on ``<prefix>/services/``; with one
(a watcher that routes k services and serves no DNS/HTTP) it holds k watchers, one per
``<prefix>/services/<service>/``, so etcd sends this host only what it routes. Each watcher
keeps its own last revision: after a broken stream every watcher resumes from the revision
after the last it delivered (or was told of by a progress notification); nothing is read again.
Only when etcd has compacted that revision, or is behind it (a cluster restored from a backup:
etcd 3.4 restores the backup's revision, and a watch from a later one would wait, silent, until
etcd caught up), or answers the resume with a message over the receive limit (big values:
:mod:`~discovery.registry.etcd_refusal`), does the watch read what it follows once more (a
watch of a host's own keys: that host's entries) and send a ``reset``. etcd behind the watch
shows in the answer that creates a watcher (a linearizable read confirms it) or in any
linearizable read the registry makes anyway (the agent's reconcile, a watch-only host's pulse:
:mod:`~discovery.registry.etcd_rewind`), which is how a host behind ``etcd grpc-proxy`` learns
it: the proxy keeps the host's stream open while the members are down and answers a new watcher
with the revision it asked for. Those reads also compare etcd's cluster id and raft term with
what they saw before, which tell a restore after its revision has passed the host's.

**After a lost connection** (not at the first start) a fleet must not come back at once:

- a broken stream (one the server ended without an error too) is re-opened soon (another
  member, within a third of the spread below) if it held for a second, then with jittered
  backoff (:func:`discovery.retry.backoff_async`) whose random part is the URL's ``spread=``
  (3 s): the fleet's streams come back over that window, not in the registry's first second,
  nor in a loop;
- with k > 1 services the stream *resumes wide*: one watcher on ``<prefix>/services/`` from the
  oldest of the k revisions, filtered here (an event of another service is dropped, one of a
  followed service already delivered is skipped), so a resume costs etcd one ``WatchCreate``
  instead of k. A prefix watcher sends in revision order, one revision's events in one message:
  each message delivers every followed range up to its last event, so a quiet service's old
  revision does not make the next resume replay the whole prefix since then again.
  ``NARROW_AFTER`` (10 to 60 s, at random) later, the watch goes back to its k watchers (a new
  stream, each from its own revision), so in steady state etcd again sends this host only what
  it routes; until then it receives every change of the registry
  (docs/operations.md#a-full-registry-restart);
- etcd *refusing* (a watcher denied, a failed login) is no lost connection: the registry is not
  reported down, each refusal is logged, the wait doubles to a minute; a wide resume denied
  resumes with the k watchers (:mod:`~discovery.registry.etcd_refusal`);
- a stream on a member that hangs is left for another (:mod:`~discovery.registry.etcd_hang`).
With ``keys`` (etcd_own): a watcher each (a key; a prefix, ``/``-ended), never wide, ``later``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.utils import prefix_range_end

from discovery.registry import etcd_aio, etcd_refusal
from discovery.registry.base import Change, ChangeCallback, deliver
from discovery.registry.etcd_hang import HangProbe
from discovery.retry import RESUME_SPREAD

if TYPE_CHECKING:
    from discovery.registry.etcd_aio import Endpoint
    from discovery.registry.etcd_source import WatchSource

log = logging.getLogger(__name__)

ENDPOINT_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.INTERNAL)
REQUIRE_LEADER = (("hasleader", "true"),)  # etcd ends a watch whose member loses its leader
#: seconds (uniform between the two) a watch that resumed wide stays wide
NARROW_AFTER = (10.0, 60.0)


class EtcdWatch:
    """Follows the registry (or some services of it) on the registry's ``loop``
    (:mod:`~discovery.registry.etcd_aio`: one asyncio task and stream, no thread of its own);
    ``stop()`` ends it. ``services``: None for everything, else only those services'
    instances. Changes are delivered on the loop's thread; what may block (authenticating, a
    re-read after compaction, the registry's state listeners) runs in the loop's executor."""

    def __init__(self, reg: WatchSource, callback: ChangeCallback, start_revision: int,
                 services: Collection[str] | None = None, spread: float = RESUME_SPREAD,
                 keys: Collection[str] = (), later: tuple[float, float] | None = None) -> None:
        self._reg, self._callback = reg, callback
        self._root = root = reg.url.services_root + "/"
        self._services = None if services is None else frozenset(services)
        self._ranges = sorted(keys) or ([root] if self._services is None  # keys: etcd_own
                                        else [f"{root}{s}/" for s in sorted(self._services)])
        self._revs = dict.fromkeys(self._ranges, start_revision)  # last revision delivered
        self._stopped = threading.Event()
        self._stream: Any = None
        self.endpoint: Endpoint | None = None  # the member of the stream open now
        self._reauth = False
        self._failures = etcd_refusal.WatchFailures(reg.where, spread, log, later)  # waits
        self._denied = etcd_refusal.DeniedRanges(reg.where, spread, log)  # services etcd denies
        self._asking: asyncio.Future[bool] | None = None
        self._lost = False  # a stream broke: the next one resumes wide (k > 1)
        self._widen = not keys  # False once etcd denied a wide resume (or keys: etcd_own)
        self._ending = False  # we end the stream ourselves: to narrow it, or a renewed token
        self._leaving = False  # ... because its member hangs (_leave): resumed elsewhere
        self._hang = HangProbe(lambda: reg.loop.loop, reg.client, self._leave)  # etcd_hang
        self.wide = False  # the current stream follows the whole prefix (filtered here)
        # each range's revision when the wide stream began: what it delivers at or below that
        # was delivered before (one revision may hold many events: a lease's deletes)
        self._floor: dict[str, int] = {}
        # etcd answered a read behind us, or as another cluster or at a lower raft term: the
        # next stream reads everything again first (a re-read since then clears it)
        self._rewinding = False
        self._task = reg.loop.start(self._run())

    @property
    def revision(self) -> int:
        """The revision every watched range (but those etcd denies) has been delivered up to."""
        revs = [v for r, v in self._revs.items() if r not in self._denied.ranges]
        return min(revs or self._revs.values(), default=0)

    @property
    def seen(self) -> int:
        """The latest revision this watch has delivered or been told of."""
        return max(self._revs.values(), default=0)

    @property
    def resuming(self) -> bool:  # a stream broke, and none has held its watchers since
        return self._failures.failing

    def rewound(self, revision: int, why: str = "") -> None:
        """From any thread: a linearizable read made after this watch had seen :attr:`seen`
        was answered at ``revision``, behind it (a backup restored), or ``why`` (another cluster,
        a lower raft term: :class:`ClusterSeen`). The stream ends; all is read again (``reset``)."""
        with contextlib.suppress(RuntimeError):  # the registry closed its loop meanwhile
            self._reg.loop.loop.call_soon_threadsafe(self._rewind, revision, why)

    def _rewind(self, revision: int, why: str = "") -> None:
        if self._stopped.is_set() or (not why and revision >= self.seen):
            return
        log.warning("etcd watch: %s; re-reading all", why or (
            f"etcd answered at revision {revision}, behind the {self.seen} seen here "
            "(restored from a backup?)"))
        self._rewinding = True
        if self._stream is not None:
            self._stream.cancel()

    def stop(self) -> None:
        self._stopped.set()
        self._task.stop(5)  # the task ends its stream on its way out

    async def _run(self) -> None:
        if not self._ranges:  # filtered to no service at all: nothing to follow
            await asyncio.Event().wait()  # until cancelled
        try:
            while not self._stopped.is_set():
                async for attempt in self._failures.link_backoff(self._stopped):
                    with attempt:
                        await self._follow_once()
        except Exception:  # only when stopped: backoff retries forever otherwise
            return

    async def _follow_once(self) -> None:
        try:
            await self._follow()
        except Exception as exc:
            if self._stopped.is_set():
                return
            if etcd_refusal.refused(exc):  # etcd said no: not down; a wait that doubles
                return await self._failures.refused(exc, self.revision)
            if not isinstance(exc, etcd_refusal.StreamEnded):  # (a balancer's timer: not down,
                self._lost = self._resume_wide  # nor resumed wide)
                await asyncio.to_thread(self._reg.set_state, False)
            if not await self._failures.lost(exc, self.revision):
                raise  # the backoff waits (a fixed resume spread)

    def _create(self, rng: str) -> Any:
        rev = self._revs.get(rng, self.revision)  # the wide watcher: the oldest
        return etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=rng.encode(), range_end=prefix_range_end(rng.encode()) if rng.endswith("/")
            else rng.encode() + b"\0",  # one key
            start_revision=rev + 1 if rev else 0, progress_notify=True))

    async def _follow(self) -> None:
        """One watch stream, each range from its own revision + 1, until it breaks or we stop.
        The watchers are created one after the other, so each ``created`` answer names the
        range it is for (a gRPC proxy numbers watchers its own way)."""
        reg = self._reg
        await asyncio.to_thread(reg.auth.ensure)
        if self._rewinding:
            await self._reread()
        endpoint, channel = reg.channels.pick(reg.client)
        self.endpoint = endpoint
        self._ending = self._leaving = False
        self.wide = wide = self._lost
        self._floor = dict(self._revs)
        pending = [self._root] if wide else self._denied.first(self._ranges)
        token = reg.auth.metadata()  # etcd checks each watcher against the stream's own
        ids: dict[int, str] = {}
        narrow, asking, held = None, None, False
        stream = self._stream = etcdrpc.WatchStub(channel).Watch(
            metadata=REQUIRE_LEADER + token)
        unfollow = self._hang.follow(endpoint, stream, lambda: bool(pending))  # etcd_hang

        async def advance() -> bool:
            """The next watcher's create or, none left, the stream holds: False to end it."""
            nonlocal held, narrow, asking
            if self._leaving:  # its member hangs: the calls are not sent back there
                return False
            if pending:
                return (await etcd_aio.write(stream, self._create(pending[0]))
                        or etcd_refusal.ended(endpoint))
            if self._rewinding:  # a service etcd denied is allowed: read everything first
                return False
            loop = asyncio.get_running_loop()
            if not held:
                held = True
                self._failures.held()  # (now: the awaits below may wait for the executor)
                reg.client.follow(endpoint)  # one connection: the calls come here
                await reg.channels.prune(reg.members_in_use())
                await asyncio.to_thread(reg.set_state, True)
                self._reauth = False
                if wide:
                    narrow = loop.call_later(random.uniform(*NARROW_AFTER), self._narrow, stream)
            if self._denied.ranges and not wide:  # a wide stream narrows soon: asked then
                asking = loop.call_later(self._denied.wait(len(ids)), self._ask, stream, pending,
                                         token)
            return True

        try:
            await etcd_aio.write(stream, self._create(pending[0])) or etcd_refusal.ended(endpoint)
            while (resp := await stream.read()) is not grpc.aio.EOF:
                self._hang.heard()
                if resp.compact_revision:
                    log.warning("etcd watch: revision %d compacted (now %d); re-reading all",
                                self.revision + 1, resp.compact_revision)
                    await self._reread()
                    return
                if resp.created and not resp.canceled and int(resp.header.revision) < self.seen:
                    # behind us, or a member still catching up after its own restart: a
                    # linearizable read tells (checked() rewinds us, on this loop, before
                    # the read's answer resumes this task)
                    await asyncio.to_thread(self._reg.revision)
                    if self._rewinding:
                        return  # the next stream reads everything again first
                if resp.canceled:
                    reason = resp.cancel_reason  # etcd < 3.4.22 / 3.5.6 denies a forgotten
                    if not self._reauth and (reg.auth.stale(reason) or (  # token (#12385)
                            reg.auth.enabled and etcd_refusal.denied(reason) and not ids)):
                        reg.auth.drop()  # our token expired: once, a new stream at once
                        self._reauth = True
                        return
                    if wide and pending and etcd_refusal.denied(reason):  # the role reads k ranges
                        self._widen = self._lost = False  # a new stream at once, with those
                        self._failures.narrowed(reason, self._root, len(self._ranges))
                        return
                    if (resp.created and not wide and pending and etcd_refusal.denied(reason)
                            and (ids or len(pending) > 1)):  # one service: the others go on
                        self._denied.skip(pending.pop(0), reason)
                        if not await advance():
                            return
                        continue
                    raise etcd_refusal.canceled(reason, pending[0] if pending else self._root)
                rng = ids.get(resp.watch_id)
                if resp.created and pending:
                    rng = ids[resp.watch_id] = pending.pop(0)
                    if not self._revs.get(rng, -1):
                        self._revs[rng] = int(resp.header.revision)
                    if self._denied.allowed(rng):  # never followed, or not for a while
                        self._rewinding = True
                    if not await advance():
                        return
                    continue
                if rng is None:
                    continue
                for ev in resp.events:
                    self._event(rng, ev)
                # delivered up to a progress notification's revision (its range; wide: all)
                # or, wide, the last event's: every followed range (module docstring)
                upto = resp.events[-1].kv.mod_revision if resp.events else resp.header.revision
                for r in (self._ranges if wide else () if resp.events else (rng,)):
                    self._revs[r] = max(self._revs[r], int(upto))
            etcd_refusal.ended(endpoint)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current and current.cancelling():
                raise
            if self._ending:
                self._ending = self._lost = False  # our own cancel: the next stream holds
                return  # the k watchers, with the token held now
            if self._rewinding:
                return  # our own cancel: the next stream reads everything again first
            if not self._leaving:
                raise
        except grpc.RpcError as exc:
            if self._stopped.is_set():
                return
            if etcd_refusal.over_limit(exc):  # the same resume would fail so again (etcd_refusal)
                self._failures.too_large(exc, self.revision)
                self._rewinding = True  # the next stream reads everything first
                return
            if not self._leaving:  # (else a write to the stream cancelled to leave)
                if exc.code() in ENDPOINT_DOWN:
                    endpoint.fail()
                reg.auth.stale(exc)
                raise
        finally:
            unfollow()
            if self._leaving and not (self._ending or self._rewinding):  # at once, elsewhere,
                self._lost = self._resume_wide  # as after a lost link (wide)
            for timer in (narrow, asking, self._asking):
                if timer is not None:
                    timer.cancel()
            self._stream = self.endpoint = None
            stream.cancel()

    @property
    def _resume_wide(self) -> bool:  # the next stream on the whole prefix (k > 1, all resumed)
        return self._widen and len(self._ranges) > 1 and all(self._revs.values())

    def _leave(self, stream: Any) -> None:
        """``stream``'s member hangs (etcd_hang): another member's, from where it was."""
        if (here := self.endpoint) is None or self._stream is not stream or self._ending:
            return
        log.warning("etcd watch: member %s does not answer; following on another one %s",
                    here.netloc, etcd_refusal.resuming(self.revision))
        self._leaving = True
        here.fail()  # the next stream goes elsewhere (a mark of 1 s, from now)
        stream.cancel()

    async def _reread(self) -> None:
        """Read everything followed again and deliver it as a ``reset``; the next stream
        resumes from the revision of that read (which answers any rewind told before it)."""
        self._rewinding = False
        try:
            snap = await asyncio.to_thread(self._reg.snapshot, self._services)
        except BaseException:
            self._rewinding = True  # not read: the next stream reads again first
            raise
        self._revs = dict.fromkeys(self._ranges, snap.revision)
        # a service the read left out: its watcher, once etcd allows it, reads everything again
        self._denied.ranges.update(f"{self._root}{s}/" for s in snap.withheld)
        self._deliver(Change("reset", snapshot=snap, revision=snap.revision))

    def _ask(self, stream: Any, pending: list[str], token: Any) -> None:
        """Ask etcd again, on the same stream, for the watchers it denied; on a new one if the
        token was renewed since this one opened (etcd checks a watcher against the stream's
        token, which may have expired: a JWT's life)."""
        if self._stream is not stream or self._stopped.is_set() or pending:
            return
        if self._reg.auth.metadata() != token:
            self._ending = True
            stream.cancel()
            return
        pending.extend(sorted(self._denied.ranges))
        self._asking = asking = asyncio.ensure_future(
            etcd_aio.write(stream, self._create(pending[0])))
        asking.add_done_callback(lambda t: t.cancelled() or t.exception())  # the read says why

    def _narrow(self, stream: Any) -> None:
        """The wide stream has served its resume: end it; the next one holds k watchers."""
        if self._stream is stream and not self._stopped.is_set():
            self._ending = True
            stream.cancel()

    def _event(self, rng: str, ev: Any) -> None:
        reg = self._reg
        key, rev = ev.kv.key.decode("utf-8", "replace"), int(ev.kv.mod_revision)
        split = reg.url.split_key(key)
        deleted = ev.type == kv_pb2.Event.DELETE
        if not deleted and split is not None:
            reg.reads.add(ev.kv.key, ev.kv.value)  # what etcd sent, followed or not
        if rng not in self._revs:  # the wide watcher: only followed services, each event once
            rng = f"{self._root}{split[0]}/" if split is not None else ""
            if rng not in self._revs or rev <= self._floor.get(rng, 0):
                return
        self._revs[rng] = max(self._revs[rng], rev)
        if split is None:
            return
        if deleted:
            self._deliver(Change("delete", key=split, revision=rev))
        elif (inst := reg.decoder.decode(key, ev.kv.value)) is not None:
            self._deliver(Change("put", key=split, instance=inst, revision=rev,
                                 unowned=not ev.kv.lease))
        # else a value that does not decode: readers keep their last good one (Snapshot.
        # unreadable: one bad write takes no instance out of every host's routing)

    def _deliver(self, change: Change) -> None:
        deliver(self._callback, change, self._stopped)
