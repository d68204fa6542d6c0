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
reads, etcd out of space, must not get them at the round-trip rate from every host). Called
with the agent's lock held: no lock of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from discovery.agent.history import LOST, Cause, History
from discovery.agent.tracked import Key
from discovery.errors import RegistryDenied, RegistryError, RegistryUnavailable
from discovery.metrics import Metrics
from discovery.model import Instance, State
from discovery.registry import Registry, Snapshot
from discovery.retry import RetryAt

log = logging.getLogger(__name__)


class Registrations:
    def __init__(self, registry: Registry, node: str, metrics: Metrics, history: History,
                 wake: Callable[[], None]) -> None:
        self.registry, self.node = registry, node
        self.metrics, self.history, self._wake = metrics, history, wake
        self.written: dict[Key, Instance] = {}  # by this process, on our lease/session
        self.adopt: set[Key] = set()  # ours in the registry from an earlier run: start healthy
        # a registration that failed may have been written all the same (its answer lost): if
        # it is not wanted any more it is deleted anyway, since the reconcile may not see it
        # (a ZooKeeper node without its index node; Nerve's sequential node)
        self.unsure: set[Key] = set()
        self.write_failed = False  # a registry write failed since the last reconcile
        self.retry = RetryAt(0.25, 30.0)  # when a reconcile may try failed writes again
        # key -> monotonic time of its last write: a reconcile leaves alone a key written
        # after its read began (its read does not show that write yet: no second write)
        self._touched: dict[Key, float] = {}

    def load(self) -> int:
        """At start: this node's entries left by an earlier run, to adopt (their checks start
        healthy, no flap). Raises :class:`RegistryError` when the registry is unreachable."""
        self.adopt = set(self.registry.node_snapshot(self.node).instances)
        return len(self.adopt)

    def write(self, key: Key, instance: Instance | None, cause: Cause | None = None) -> None:
        """Make the registry hold ``instance`` under ``key`` (or nothing); only on change.
        ``cause``: noted in the instance's history (None: the caller notes it)."""
        have = self.written.get(key)
        now = time.time()  # registered_at and the stage stamps: for propagation
        seen = cause.at if cause is not None else now
        try:
            if instance is None:
                ours = have is not None or key in self.adopt or key in self.unsure
                if ours:
                    self._touched[key] = time.monotonic()  # a write, not a call that skips
                if have is not None and have.state is State.UP:
                    # draining first: a watcher takes it out of rotation at once, and its wipe
                    # guard then sees a departure, not the start of a registry-side wipe;
                    # stamped now (its registration's stamps timed the instance's age)
                    self.registry.register(replace(have.with_state(State.DRAINING),
                                                   written_at=now, seen_at=seen))
                if ours:
                    self.registry.deregister(*key)
                    self.retry.succeeded()
                    self.metrics.deregistered()
                    log.info("deregistered %s/%s", *key)
                self.written.pop(key, None)
                self.adopt.discard(key)
                self.unsure.discard(key)
            elif have is None or not have.same_registration(instance):
                self._touched[key] = time.monotonic()
                instance = replace(instance, registered_at=now, written_at=now, seen_at=seen)
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
        except RegistryError as exc:
            log.warning("registry write for %s/%s failed (%s); a reconcile tries again in "
                        "%.2f s", *key, exc, self.failed(exc))
            return
        if cause is not None:
            state = instance.state.value if instance is not None else "down"
            self.history.record(*key, self.node, state, cause)

    def failed(self, exc: RegistryError) -> float:
        """A write failed: a reconcile is due, in the seconds returned. A refusal waits
        :attr:`retry`'s turn, which doubles once a round (the first refusal since the last
        reconcile began), not once a write; a lost link (no member answered, after the
        request's whole timeout) no turn: its reconcile finds the registry down and waits for
        its return (:meth:`unread`), whose first writes must not wait a grown turn."""
        if isinstance(exc, RegistryUnavailable):
            self.retry.now()
        elif not self.write_failed:
            self.retry.failed(0.25)  # a fleet refused at once (etcd out of space) tries apart
        self.write_failed = True
        self._wake()
        return max(self.retry.due - time.monotonic(), 0.0)

    def retry_due(self) -> float:
        """When failed writes may be tried again (monotonic; inf: none failed)."""
        return self.retry.due if self.write_failed else math.inf

    def waits(self, resync_due: float) -> bool:
        """Whether failed writes wait their turn (the resync, when due, goes on)."""
        return self.write_failed and time.monotonic() < min(resync_due, self.retry.due)

    def unread(self) -> None:
        """The reconcile for failed writes could not read: they wait for the registry's
        return (:meth:`retry_now`) or the resync."""
        self.write_failed = True
        self.retry.hold()

    def retry_now(self) -> None:
        """The registry is back: failed writes are tried at once (their wait kept)."""
        self.retry.now()

    def reconcile(self, snap: Snapshot, wanted: Mapping[Key, Instance],
                  read_at: float = float("inf")) -> None:
        """Fix the registry's view of this node (``snap``, read from ``read_at``, monotonic)
        towards ``wanted``, both ways; a key written since ``read_at`` is newer than ``snap``
        and left alone (it was taken for lost and written twice)."""
        newer = {k for k, at in self._touched.items() if at >= read_at}
        self._touched = {k: at for k, at in self._touched.items() if k in newer}
        ours = {k: i for k, i in snap.instances.items() if i.node == self.node and k not in newer}
        fixed = 0
        for key, inst in wanted.items():
            if key in newer:
                continue
            present = ours.get(key)
            mine = key in self.written
            if not mine or present is None or not present.same_registration(inst):
                lost = mine and present is None  # session expired or lease lost meanwhile
                self.written.pop(key, None)  # force the write
                self.write(key, inst, Cause("reregistered" if lost else "reconcile",
                                            LOST if lost else ""))
                fixed += 1
        for key in set(ours) - set(wanted):
            self.written[key] = ours[key]
            self.write(key, None)
            self.history.depart(key[1], Cause("reconcile", "not wanted any more"))
            fixed += 1
        for key in sorted(self.unsure - set(wanted) - set(ours) - newer):
            self.write(key, None)  # a failed registration that may have landed, not wanted
            fixed += 1
        self.adopt &= set(wanted)
        log.log(logging.INFO if fixed else logging.DEBUG,
                "reconcile done: %d wanted, %d in registry, %d fixed",
                len(wanted), len(ours), fixed)
