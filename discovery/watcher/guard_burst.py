"""The wipe guard's count: the burst of up instances taken out, and when it makes a wipe.

Rule 1 of :mod:`discovery.watcher.guard`: up instances removed (or drained by another writer,
:func:`foreign_drain`), each less than ``window`` after the one before, reaching ``fraction``
of the catalog as it was when the burst began, or leaving ``fraction`` of its services with
none serving (up and of weight above 0), their last instances on more than one node.
Pure bookkeeping, under the guard's lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.model.instance import STAMP_AHEAD, trusted
from discovery.registry import Change
from discovery.watcher.guard_settings import GuardSettings

log = logging.getLogger(__name__)
Key = tuple[str, str]


@dataclass
class GuardStatus:
    """What /v1/health and /metrics show."""

    holding: int = 0
    settling: int = 0
    engaged: int = 0  # times a wipe was detected
    held_total: int = 0  # instances ever held
    last_engaged: float | None = None  # unix time


def foreign_drain(before: Instance, after: Instance) -> bool:
    """Whether ``after`` takes the up instance ``before`` out of rotation without being its
    agent's write: out of every answer (``draining``), or, serving (weight above 0,
    :attr:`~discovery.model.Instance.serving`), out of HAProxy's (weight 0). An agent stamps
    every write of its own (``written_at``, newer than the one before), while a script that
    rewrites the values, an old backup restored or a hand-written record carries the stamp it
    had, or none. Records with no stamp at all (Nerve's layout, a writer of its own) are never
    taken for one; the owners write such values back (registry/owned.py). Nor is one whose
    stamp is more than half :data:`~discovery.model.instance.STAMP_AHEAD` ahead of this
    host's clock (a clock far ahead, or written by hand): its agent stamps its next write now,
    behind it."""
    return (before.state is State.UP
            and (after.state is not State.UP or (before.serving and not after.serving))
            and before.written_at > 0 and after.written_at <= before.written_at
            and trusted(before.written_at, time.time(), STAMP_AHEAD / 2))


class Burst:
    """The current burst and whether it is a wipe (``status`` counts the wipes seen)."""

    def __init__(self, catalog: Catalog, settings: GuardSettings, status: GuardStatus) -> None:
        self.catalog, self.settings, self.status = catalog, settings, status
        self.removed: set[Key] = set()  # the up instances it took out (a flap counts once)
        self.base = 0  # the catalog's size when it began
        # its services left with none serving (-> the node their last one was on), and how
        # many services had one serving when it began
        self.emptied: dict[str, str] = {}
        self.emptied_nodes: Counter[str] = Counter()
        self.services_base = 0
        self.start = self.last = -float("inf")  # when it began, when the last one came
        self.engaged = False  # this burst is a wipe
        self.node: str | None = None  # the node of its first removal
        self.spread = False  # it took instances of more than one node
        self.span = (float("inf"), -float("inf"))  # the last wipe: its first and last removal
        # the removals it applied at once (each left its service another instance) -> the
        # instance, the change and when: put back if it turns out a wipe (WipeGuard._put_back)
        self.applied: dict[Key, tuple[Instance, Change, float]] = {}

    def note(self, now: float, removed: dict[Key, str], emptied: dict[str, str]) -> bool:
        """Up instances ``removed`` (-> their node), leaving the services of ``emptied`` with
        none serving (-> the node of their last); True when that made this burst a wipe."""
        s = self.settings
        if now - self.last > s.window or (not self.engaged and now - self.start > s.horizon):
            # a new burst: after a pause, or a trickle that did not make a wipe within `horizon`
            # (crashes replaced as they come must not add up to half the catalog for ever)
            self.removed, self.base, self.engaged = set(), self.catalog.size(), False
            self.emptied, self.emptied_nodes = {}, Counter()
            self.services_base = self.catalog.serving_services()
            self.start, self.node, self.spread, self.applied = now, None, False, {}
        self.removed.update(removed)
        for node in removed.values():
            if self.node is None:
                self.node = node
            elif node != self.node:
                self.spread = True
                break
        for service, node in emptied.items():
            if service not in self.emptied:
                self.emptied[service] = node
                self.emptied_nodes[node] += 1
        self.last = now
        was = self.engaged
        if not self.engaged and (self._reached(len(self.removed), self.base)
                                 or (self._reached(len(self.emptied), self.services_base)
                                     and len(self.emptied_nodes) > 1)
                                 # all of a small catalog (a client following a service of 2:
                                 # under min_removed), of more than one node: a host's death
                                 # never is one
                                 or (self.spread and len(self.removed) >= self.base > 0)):
            self.engaged = True
            self.status.engaged += 1
            self.status.last_engaged = time.time()
            log.warning("wipe guard engaged: %d instances removed from the registry (or "
                        "drained by another writer), each within %.1fs of the one before (%d "
                        "in the catalog), %d of %d services left with none serving: removals are "
                        "held until re-registered, at most %.0fs", len(self.removed), s.window,
                        self.base, len(self.emptied), self.services_base, s.hold)
        if self.engaged:
            self.span = (self.start, now)
        return self.engaged and not was

    def refilled(self, services: set[str]) -> None:
        """These services have an instance serving again: no longer emptied by this burst."""
        for service in services & self.emptied.keys():
            node = self.emptied.pop(service)
            self.emptied_nodes[node] -= 1
            if not self.emptied_nodes[node]:
                del self.emptied_nodes[node]

    def pause(self) -> float:
        """How long removals must stop before a settling last instance goes: ``settle`` after
        one node's (a host's death, one delete) or fewer than ``min_removed``, ``window`` once
        the burst took that many of more than one node (hosts dying one after another, or a
        wipe reaching the watcher as a stream with pauses: etcd's lessor revokes leases a
        tick, 0.5 s, apart; a loaded watcher reads in batches), seen a wipe only at half."""
        wide = self.spread and len(self.removed) >= self.settings.min_removed
        return self.settings.window if wide else self.settings.settle

    def took(self, since: float) -> bool:
        """Whether a removal at ``since`` was of the last wipe (over or not; a removal after it,
        a new burst, does not change that)."""
        return self.span[0] <= since <= self.span[1]

    def _reached(self, removed: int, base: int) -> bool:
        return removed >= self.settings.min_removed and \
            removed >= self.settings.fraction * max(base, 1)

    def wiped(self, now: float) -> bool:
        """Whether a wipe goes on: this burst reached the mark, and is not over."""
        return self.engaged and now - self.last <= self.settings.window
