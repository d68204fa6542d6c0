"""What one agent has written to the registry, and the writes that keep it so.

The agent (:mod:`discovery.agent.core`) decides what should be registered (Docker, checks,
warm-ups, maintenance); this writes it, only on change, and reconciles the registry's view of
this node (read alone: :meth:`~discovery.registry.base.Registry.node_snapshot`) with what is
wanted, both ways. An instance this agent registered ``up`` leaves as ``draining`` first, then
is deleted: every watcher drains it at once, and a watcher's wipe guard
(:mod:`discovery.watcher.guard`) tells the departure from a registry-side wipe, which deletes
``up`` entries, and so never holds it in rotation. A failed write is logged and left to the
next reconcile, which the agent runs sooner (``wake``): after 0.25 s, doubling to 30 s while
writes keep failing (:attr:`Registrations.retry`; a registry that refuses writes but answers
reads, etcd out of space, must not get them at the round-trip rate from every host).

The agent decides under its lock and writes outside it: :meth:`Registrations.want` adds a
wish (:mod:`~discovery.agent.wishes`) and returns; a thread writes the wishes in order, so a
write to a member that never answers (up to its request's timeout) holds no Docker event,
check transition or ``PUT /v1/agent/maint`` meanwhile (three such writes held the agent 14 s).
After such a lost link the wishes still pending are left to the reconcile at the registry's
return. The reconcile, too, only adds wishes, under the agent's lock and this class's ``_io``
(no write under way): a decision made after it (a kill) replaces its wish for that key.

A write whose answer was lost (no member answered within the request's timeout) may still land
later, once the member that holds it runs again: after a later write of the same key (a
delete, the container dead) it would put back what that write replaced, a dead container
``up``, until the next resync (30 s by default). So the first write of that key to succeed
afterwards asks for one more reconcile (a *recheck*: :meth:`Registrations.retry_due`), twice
the lost write's wait later (±10 %): it deletes, or writes again, what landed late.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from discovery.agent.history import LOST, Cause, History
from discovery.agent.tracked import Key
from discovery.agent.wishes import Wish, Wishes
from discovery.errors import RegistryDenied, RegistryError, RegistryUnavailable
from discovery.metrics import Metrics
from discovery.model import Instance, State
from discovery.model.instance import stamp_after
from discovery.registry import Registry, Snapshot
from discovery.registry.readback import ReadBack, wire_of
from discovery.retry import RetryAt, jittered

log = logging.getLogger(__name__)
STOP_WAIT = 5.0  # seconds the writes left at the agent's stop get


class Registrations:
    def __init__(self, registry: Registry, node: str, metrics: Metrics, history: History,
                 wake: Callable[[], None]) -> None:
        self.registry, self.node = registry, node
        self.metrics, self.history, self._wake = metrics, history, wake
        self.written: dict[Key, Instance] = {}  # by this process, on our lease/session
        self.adopt: set[Key] = set()  # ours in the registry from an earlier run: start healthy
        self.adopted = False  # adopt was read (load, or the first node read after it failed)
        # a registration that failed may have been written all the same (its answer lost): if
        # it is not wanted any more it is deleted anyway, since the reconcile may not see it
        # (a ZooKeeper node without its index node; Nerve's sequential node)
        self.unsure: set[Key] = set()
        self.write_failed = False  # a registry write failed since the last reconcile
        self.retry = RetryAt(0.25, 30.0)  # when a reconcile may try failed writes again
        # key -> monotonic time of its last write: a reconcile leaves alone a key written
        # after its read began (its read does not show that write yet: no second write)
        self._touched: dict[Key, float] = {}
        self._io = threading.Lock()  # held by the write under way, and by the reconcile
        self._flag = threading.Lock()  # write_failed and retry: set by writes, taken by the loop
        self._lost = False  # the last failed write's link was lost (no member answered)
        self._late: dict[Key, float] = {}  # key -> how long its write waited, its answer lost
        # key -> the newest stamp sent (answered or not; till its delete): the next is after it
        self._stamped: dict[Key, float] = {}
        self._rechecks: list[float] = []  # heap: reconciles for lost writes (monotonic)
        self._moved = False  # the run loop was woken to learn of a sooner recheck
        self._asked = False  # ... or for a reconcile at once (reconcile_soon)
        self._wishes = Wishes(self._write_wish, self._io, self._broken)
        # what a read gives back of what is wanted, as the layout carries it (Nerve's record
        # holds less): a reconcile compares with that, else it writes such a one every time
        self._read_back = ReadBack(wire_of(getattr(registry, "url", None)), lambda: self.written)
        metrics.follow_writes(self._wishes.count)

    def load(self) -> int:
        """At start: this node's entries left by an earlier run, to adopt (their checks start
        healthy, no flap). Raises :class:`RegistryError` when the registry is unreachable."""
        self.adopt = set(self.registry.node_snapshot(self.node).instances)
        self.adopted = True
        return len(self.adopt)

    def adopt_late(self, snap: Snapshot, failing: Callable[[Key], bool]) -> set[Key]:
        """The keys of this node's entries in ``snap`` (a node read), adopted now if
        :meth:`load` failed at start (the registry did not answer) and none was since; else
        none. Before, none were ever adopted then: the first reconcile after the registry's
        return drained and deleted an earlier run's entries of containers still warming up or
        short of ``rise``, serving ones (called under the agent's lock, before it decides).
        Not adopted: what this process wrote or is to write (its own, not an earlier run's),
        and those whose check has failed since the start (``failing``: it is failing now)."""
        if self.adopted:
            return set()
        self.adopted = True
        mine = self.written.keys() | self.unsure | self._wishes.keys()
        late = {k for k, i in snap.instances.items()
                if i.node == self.node and k not in mine and not failing(k)}
        self.adopt |= late
        if late:
            log.info("%d of this node's instances registered already (adopted)", len(late))
        return late

    def want(self, key: Key, instance: Instance | None, cause: Cause | None = None, *,
             force: bool = False, departs: Cause | None = None) -> None:
        """The registry should hold ``instance`` under ``key`` (or nothing): written soon, by a
        thread of its own, and only the newest wish of a key (:class:`Wish`). Returns at once.
        Called under the agent's lock: the wishes keep the order of its decisions; an earlier
        run's instance (adopted) not wanted any more is adopted no longer from now (the same
        key back starts afresh: checked, warmed up) and stays ours to delete (``unsure``)."""
        if instance is None and key in self.adopt:
            self.unsure.add(key)
            self.adopt.discard(key)
        self._wishes.add(key, Wish(instance, cause, force, departs))

    def _write_wish(self, key: Key, wish: Wish) -> None:
        """The writer thread's write of one wish (``_io`` held)."""
        if wish.left is not None:
            self.history.depart(key[1], wish.left)
        ok = self.write(key, wish.instance, wish.cause, force=wish.force)
        if wish.departs is not None:
            self.history.depart(key[1], wish.departs)
        if not ok and self._lost:  # each would wait its own timeout first
            dropped = self._drop()
            if dropped:
                log.warning("%d more registry writes left to the reconcile", dropped)

    def _broken(self, key: Key) -> None:
        """A write ended in an unexpected error (a bug, logged): it may have landed."""
        self.unsure.add(key)
        self.failed(RegistryError("unexpected error"))

    def _drop(self) -> int:
        """Forget the pending wishes (their departures told: the reconcile cannot); how many."""
        dropped = self._wishes.drop()
        for key, wish in dropped:
            for why in (wish.left, wish.departs):
                if why is not None:
                    self.history.depart(key[1], why)
        return len(dropped)

    def turn(self) -> threading.Lock:
        """The lock a reconcile holds (no write under way: what was written is known)."""
        return self._io

    def held(self) -> set[Key]:
        """The keys registered, or to be once the pending writes (and the one under way) are
        done."""
        wishes = self._wishes.wished()
        keys = set(self.written)
        for key, wish in wishes:
            (keys.add if wish.instance is not None else keys.discard)(key)
        return keys

    def stop(self, revoke: bool) -> None:
        """At the agent's stop: the writes not begun are dropped if the lease's revoke follows
        (it removes all), else written (a hand-over: the successor adopts what it finds); the
        one under way is waited for. :data:`STOP_WAIT` in all: a successor's reconcile (or
        the lease) settles what is left."""
        if revoke:
            self._drop()
        if not self.flush(STOP_WAIT):
            log.warning("agent stopped with registry writes not done")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no write is pending or under way; False if ``timeout`` ran out first."""
        return self._wishes.flush(timeout)

    def write(self, key: Key, instance: Instance | None, cause: Cause | None = None, *,
              force: bool = False) -> bool:
        """Make the registry hold ``instance`` under ``key`` (or nothing) now; only on change
        (``force``: a put even if the same as the last written: the registry lost it, or holds
        it changed). ``cause``: noted in the instance's history (None: the caller notes it).
        Every write is stamped after every one of the key before it, answered or not, even if
        the clock stepped back (not after one stamped over ``STAMP_AHEAD`` ahead: then now):
        a watcher's wipe guard takes a drain not stamped newer for another writer's. False
        when the write failed (logged; a reconcile is due)."""
        have = self.written.get(key)
        now, began = time.time(), time.monotonic()  # now: the stamps, for propagation
        seen = cause.at if cause is not None else now
        touching = False  # a write, not a call that skips: its time kept once it succeeded
        try:
            if instance is None:
                ours = touching = have is not None or key in self.adopt or key in self.unsure
                if have is not None and have.state is State.UP:
                    # draining first: a watcher takes it out of rotation at once, and its wipe
                    # guard then sees a departure, not the start of a registry-side wipe;
                    # stamped now (its registration's stamps timed the instance's age)
                    self.registry.register(replace(have.with_state(State.DRAINING),
                                                   written_at=self._stamp(key, have, now),
                                                   seen_at=seen))
                if ours:
                    self.registry.deregister(*key)
                    self.retry.succeeded()
                    self.metrics.deregistered()
                    log.info("deregistered %s/%s", *key)
                self.written.pop(key, None)
                self._stamped.pop(key, None)
                self.adopt.discard(key)
                self.unsure.discard(key)
            elif have is None or force or not have.same_registration(instance):
                touching = True
                instance = replace(instance, registered_at=now,
                                   written_at=self._stamp(key, have, now), seen_at=seen)
                try:
                    self.registry.register(instance)
                except RegistryDenied:  # refused, so not written: nothing to delete later
                    raise
                except RegistryError:  # its answer lost, perhaps written all the same
                    self.unsure.add(key)
                    raise
                self.unsure.discard(key)
                self.retry.succeeded()
                self.metrics.registered()
                self.written[key] = instance
                log.info("registered %s/%s at %s:%d", *key, instance.address, instance.port)
        except RegistryError as exc:  # not stamped: the reconcile it wakes looks at it
            if isinstance(exc, RegistryUnavailable):  # it may land later still
                self._late[key] = time.monotonic() - began
            log.warning("registry write for %s/%s failed (%s); a reconcile tries again in "
                        "%.2f s", *key, exc, self.failed(exc))
            return False
        if touching:  # (a write landing while a reconcile reads is newer than what it read)
            self._touched[key] = time.monotonic()
            if (waited := self._late.pop(key, None)) is not None:
                self._recheck_after(key, 2 * waited)
        if cause is not None:
            state = instance.state.value if instance is not None else "down"
            self.history.record(*key, self.node, state, cause)
        return True

    def _stamp(self, key: Key, have: Instance | None, now: float) -> float:
        """A write's ``written_at``, recorded before it is sent (its answer may be lost)."""
        floor = max(have.written_at if have is not None else 0.0, self._stamped.get(key, 0.0))
        self._stamped[key] = stamp = stamp_after(floor, now)
        if stamp < floor:  # too far ahead to trust: this write replaces it
            log.warning("%s/%s was stamped %.0f s ahead of this host's clock (written_at: a "
                        "clock far ahead, or written by hand): not followed, stamped now",
                        *key, floor - now)
        return stamp

    def failed(self, exc: RegistryError) -> float:
        """A write failed: a reconcile is due, in the seconds returned. A refusal waits
        :attr:`retry`'s turn, which doubles once a round (the first refusal since the last
        reconcile began), not once a write; a lost link (no member answered, after the
        request's whole timeout) no turn: its reconcile finds the registry down and waits for
        its return (:meth:`unread`), whose first writes must not wait a grown turn."""
        with self._flag:  # the run loop takes the flag (take_failed) from another thread
            self._lost = isinstance(exc, RegistryUnavailable)
            if self._lost:
                self.retry.now()
            elif not self.write_failed:
                self.retry.failed(0.25)  # a fleet refused at once (etcd out of space): apart
            self.write_failed = True
        self._wake()
        return max(self.retry.due - time.monotonic(), 0.0)

    def _recheck_after(self, key: Key, seconds: float) -> None:
        """A write of ``key`` succeeded after one whose answer was lost: a reconcile in about
        ``seconds`` finds that one if it landed late (module docstring)."""
        at = time.monotonic() + jittered(seconds)
        log.info("a write of %s/%s whose answer was lost may still land: a reconcile looks "
                 "again in %.1f s", *key, at - time.monotonic())
        with self._flag:
            sooner = not self._rechecks or at < self._rechecks[0]
            heapq.heappush(self._rechecks, at)
            self._moved |= sooner
        if sooner:  # the run loop sleeps until a later one, or the resync
            self._wake()

    def _recheck(self) -> float:
        """The next recheck (monotonic; inf: none)."""
        return self._rechecks[0] if self._rechecks else math.inf

    def reconcile_soon(self) -> None:
        """Wake the run loop for a reconcile at once (Docker listed), never taken for a wake
        that only tells of a recheck."""
        with self._flag:
            self._asked = True
        self._wake()

    def take_failed(self) -> bool:
        """Whether a write failed, or a recheck came due, since the last call, cleared (the
        reconcile about to run tells them, and one that cannot read leaves them owed: see
        :meth:`unread`): one step, so a failure meanwhile is not lost."""
        with self._flag:
            failed, self.write_failed = self.write_failed, False
            now = time.monotonic()
            while self._rechecks and self._rechecks[0] <= now:
                heapq.heappop(self._rechecks)
                failed = True
        return failed

    def owed(self) -> bool:
        """Whether a reconcile is owed now: a write failed, or a recheck is due."""
        return self.write_failed or time.monotonic() >= self._recheck()

    def retry_due(self) -> float:
        """When failed writes may be tried again, or the next recheck is due (monotonic; inf:
        neither)."""
        return min(self.retry.due if self.write_failed else math.inf, self._recheck())

    def waits(self, resync_due: float) -> bool:
        """Whether failed writes wait their turn, or the run loop was woken only to learn of
        a sooner recheck (the resync, when due, goes on)."""
        with self._flag:
            moved = self._moved and not self._asked
            self._moved = self._asked = False
        now = time.monotonic()
        if self.write_failed:
            return now < min(resync_due, self.retry.due, self._recheck())
        return moved and now < min(resync_due, self._recheck())

    def unread(self, down: bool = True) -> None:
        """The reconcile for failed writes could not read: they wait for the registry's
        return (:meth:`retry_now`) or the resync; while it is not reported ``down`` (a read
        timed out on a connection kept: no return to wait for) the retry's next turn."""
        with self._flag:
            self.write_failed = True
            if down:
                self.retry.hold()
            else:
                self.retry.failed(0.25)

    def retry_now(self) -> None:
        """The registry is back: failed writes are tried at once (their wait kept)."""
        self.retry.now()

    def reconcile(self, snap: Snapshot, wanted: Mapping[Key, Instance],
                  read_at: float = float("inf")) -> None:
        """Wishes that fix the registry's view of this node (``snap``, read from ``read_at``,
        monotonic) towards ``wanted``, both ways. Called holding :meth:`turn` and the agent's
        lock (``wanted`` decided under it). A key written since ``read_at`` is newer than
        ``snap``, and one with a wish pending is written next: both left alone."""
        touched = {k for k, at in self._touched.items() if at >= read_at}
        pending = self._wishes.keys()
        missing = {k for k in pending - touched - set(snap.instances) if k in self.written}
        self._wishes.force(missing)  # lost meanwhile: a pending put, though the same, written
        newer = pending | touched
        self._touched = {k: at for k, at in self._touched.items() if k in newer}
        ours = {k: i for k, i in snap.instances.items() if i.node == self.node and k not in newer}
        fixed = 0
        for key, inst in wanted.items():
            if key in newer:
                continue
            present = ours.get(key)
            if present is not None:  # written after it (another run's, a write-back's)
                self._stamped[key] = max(self._stamped.get(key, 0.0), present.written_at)
            mine = key in self.written
            unowned = key in snap.unowned  # written by hand with no lease or session: it
            # would outlive this host. unsure: its write's answer was lost, the read may show
            # it landed; written again all the same, so that the backend's own record (what it
            # puts back after a lease or session expiry) is it, not the value before
            if (not mine or present is None or not self._read_back.same(inst, present)
                    or key in self.unsure or unowned):
                lost = mine and present is None  # session expired or lease lost meanwhile
                why = LOST if lost else "no lease or session" if unowned else ""
                self.want(key, inst, Cause("reregistered" if lost else "reconcile", why),
                          force=True)
                fixed += 1
        for key in set(ours) - set(wanted):
            self.written[key] = ours[key]  # drained, then deleted
            self.want(key, None, departs=Cause("reconcile", "not wanted any more"))
            fixed += 1
        for key in sorted(self.unsure - set(wanted) - set(ours) - newer):
            self.want(key, None)  # a failed registration that may have landed, not wanted
            fixed += 1
        for key in set(self.written) - set(wanted) - set(ours) - newer - self.unsure:
            del self.written[key]  # its delete failed, and the registry has lost it since
        self.adopt &= set(wanted) | newer  # a pending delete of an adopted one: still ours
        log.log(logging.INFO if fixed else logging.DEBUG,
                "reconcile done: %d wanted, %d in registry, %d to fix (queued)",
                len(wanted), len(ours), fixed)
