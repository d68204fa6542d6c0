"""The wipe guard: a registry-side wipe never blacks out a service on every host at once.

The registry is shared by the whole fleet, so one event there — every lease revoked by a
stuck etcd leader (etcd #15247), the prefix deleted, an empty backup restored — would empty
every backend on every host at the same moment. The two known answers each have a flaw:
Synapse's ``use_previous_backends`` never lets a service go empty, so stopping the last
instance keeps traffic on it; Envoy's panic threshold routes to every host once too few are
healthy, dead ones included. Our rule:

1. A *wipe* is a burst of removals of ``up`` instances (by deletes or by a resync snapshot; or
   drained by another writer: a value that takes an up instance out of rotation, out of every
   answer as ``draining``, or, one *serving* (of weight above 0, as HAProxy sends a server of
   weight 0 nothing new: :attr:`~discovery.model.Instance.serving`), out of HAProxy's as weight
   0, without its agent's stamp on it, :func:`~discovery.watcher.guard_burst.foreign_drain`: a
   script that rewrites every value, an old backup restored; counted, settled and held as a
   removal, the instance kept as it was in the catalog, the drain applied when it is released),
   each less than ``window`` seconds (2 s) after the one before, that reaches at least
   ``min_removed`` (3) instances and at least ``fraction`` (50 %) of the catalog as it was when
   the burst began, or all of it, of more than one node (a flap counts once); or that leaves
   at least ``min_removed`` services, and ``fraction`` of those with one serving when it began,
   with none serving, their last instances on more than one node (one large service must not
   hide a wipe of all the others: 1,000 instances of 100 services deleted beside a service of
   2,000 did not count; one host's death is never a wipe by this count). A burst, not a fixed
   window: a wipe of 100,000 instances takes the watcher seconds to apply, and etcd revokes
   expired leases at most 1,000 a second, so half the catalog never goes within any 2 s
   (measured: a sliding 2 s window let most of such a wipe through on every host). A burst that
   has not made a wipe within ``horizon`` (30 s) starts again: crashes replaced as they come
   must not add up to half the catalog. An agent drains what it deregisters (``draining``
   first, then the delete), so a departure, such as a rolling deploy of a small service, never
   counts, and is never held (on ZooKeeper, whose events carry no data, a delete read right
   after a change of the same node is taken as that:
   :attr:`~discovery.registry.base.Change.drained`).
2. Outside a wipe, a removal that leaves its service another instance doing what it did
   (serving; for one of weight 0, up: DNS's and HTTP's) is applied at once (a rolling deploy, a
   scale-down: the guard costs nothing there). One that would not *settles* for ``settle``
   (0.2 s; it keeps serving meanwhile), then is applied unless a wipe began meanwhile; while
   3 or more removals of more than one node keep coming less than ``window`` apart it waits
   for them to pause, ``horizon`` (30 s) at most: a wipe is seen only at half the catalog. So
   a host that dies takes its instances away after its TTL, and a bare delete of a service's
   last instance stops traffic 0.2 s later (2 s if it took 3 on several nodes; an agent's,
   drained first, at once). What a burst applied so is put back once the burst is seen as a
   wipe, and held as the rest (a prefix delete comes in key order: else its first services
   were left with one instance on every host).
3. During a wipe every removal is *held*: the instance stays in the catalog (HAProxy, DNS and
   HTTP go on serving it) until it is registered again (the agents re-register after losing
   their lease or session), or the wipe is over (no removal for ``window`` seconds) and its
   service has another instance doing what it did again, or ``hold`` (45 s) passed since it was
   held, or since a held one last came back (the wipe still being written back), twice at most.
4. The price: when half the catalog really dies at once (a zone lost), its instances keep a
   share of traffic until the removals stop plus ``window``, up to ``hold`` (twice that while
   others come back) for a service with nothing else serving, which had nothing else to route
   to; HAProxy's ``retries`` and ``redispatch`` send a refused request elsewhere meanwhile.
   A last instance removed among removals of several nodes waits with them, 30 s at most.

The guard is a pure state machine driven by the watcher (one lock, no threads of its own):
:meth:`WipeGuard.filter` takes each registry change and returns what to apply now;
:meth:`WipeGuard.due` the removals whose time has come; neither costs more the more it holds
(a heap of deadlines; held entries looked at again when the wipe ends, or their service gets
a put: it walked every one on every change, and a wipe of 20,000 ran past the window).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard_burst import Burst, GuardStatus, foreign_drain
from discovery.watcher.guard_settings import GuardSettings
from discovery.watcher.guard_store import Deferrals, Deferred

__all__ = ["GuardSettings", "GuardStatus", "WipeGuard"]

log = logging.getLogger(__name__)
Key = tuple[str, str]


class WipeGuard:
    def __init__(self, catalog: Catalog, settings: GuardSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.settings = settings or GuardSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._look_at: set[str] = set()  # services with held entries that got a put since
        self._was_wiped = False
        self._preheld: dict[Key, float] = {}  # held by a predecessor, since (our clock)
        self._back = -float("inf")  # when a held instance last came back
        self.status = GuardStatus()
        self._burst = Burst(catalog, self.settings, self.status)
        self._kept = Deferrals(catalog, self.status)  # the removals kept out, settling or held

    # ---- input ----------------------------------------------------------------------------
    def filter(self, change: Change) -> list[Change]:
        """The changes to apply to the catalog now, in order, for one registry change."""
        if not self.settings.enabled:
            return [change]
        with self._lock:
            now = self._clock()
            if change.kind == "reset":
                return [self._reset(change, now)]
            if change.kind == "put" and change.instance is not None:
                return self._put(change, now)
            return self._delete(change, now)

    def due(self) -> list[Change]:
        """Removals that settled (not a wipe) or whose hold ran out: apply them now."""
        with self._lock:
            now = self._clock()
            wiped = self._burst.wiped(now)
            keys = self._kept.due_keys(now)
            if not wiped and self._was_wiped:
                keys |= self._kept.held  # the wipe is over: look at everything held again
            elif not wiped:  # a service that got a put: its held ones may go
                for service in self._look_at:
                    ids = self._kept.by_service.get(service, ())
                    keys |= {(service, i) for i in ids} & self._kept.held
            if not wiped:
                self._look_at.clear()
            self._was_wiped = wiped
            newly = expired = released = waiting = 0
            releasing: list[Key] = []  # popped once all are looked at: each stays subtracted
            for key in sorted(keys):
                entry = self._kept.entries[key]
                if entry.held_since is None:
                    if entry.due > now:
                        continue
                    took = self._burst.took(entry.since)  # (due() late: a wipe just over)
                    if wiped or (took and not self._kept.has_other(key, entry.instance)):
                        self._kept.hold(key, entry, now, self.settings.hold)
                        newly += 1
                        log.debug("wipe guard: holding %s/%s", *key)
                        continue
                    if not took and self._streaming(entry, now):
                        continue  # removals still pour in: not the service's last yet
                elif entry.due <= now:
                    if (wiped or not self._kept.has_other(key, entry.instance)) \
                            and self._coming_back(entry, now):
                        waiting += 1
                        continue
                    expired += 1
                    log.debug("wipe guard: %s/%s not back after %.0fs: removed", *key,
                              self.settings.hold)
                elif wiped or not self._kept.has_other(key, entry.instance):
                    continue  # still wiping, or its service has nothing else: keep it
                released += self._kept.entries[key].held_since is not None
                releasing.append(key)
            out = [self._release(key) for key in releasing]
            if released > expired:
                log.info("wipe guard: released %d held instances (their service has an "
                         "instance serving again, the wipe over)", released - expired)
            if newly:
                log.warning("wipe guard: holding %d more instances removed during a registry "
                            "wipe (%d in all)", newly, len(self._kept.held))
            if waiting:
                log.info("wipe guard: %d held instances kept past %.0fs: held instances still "
                         "come back (the last %.1fs ago)", waiting, now - self._back)
            if expired:
                log.warning("wipe guard: %d held instances not back after %.0fs or more: "
                            "removed", expired, self.settings.hold)
        return out

    def _coming_back(self, entry: Deferred, now: float) -> bool:
        """Whether a held entry whose ``hold`` ran out waits on: a held one came back within the
        last ``hold`` (the wipe still being written back), twice ``hold`` at most."""
        assert entry.held_since is not None
        return self._kept.again(entry, min(self._back + self.settings.hold,
                                      entry.held_since + 2 * self.settings.hold), now)

    def _streaming(self, entry: Deferred, now: float) -> bool:
        """Whether a settled removal waits on (due again then): removals still come less than
        :meth:`~Burst.pause` apart, its burst may yet be a wipe (a prefix delete reaches a
        loaded watcher over seconds: ``window`` let 22 of 50 go); ``horizon`` at most."""
        return self._kept.again(entry, min(self._burst.last + self._burst.pause(),
                                      entry.since + self.settings.horizon), now)

    def next_due(self) -> float | None:
        """Monotonic time of the next :meth:`due` work, or None."""
        with self._lock:
            return self._kept.next_due()

    def wiping(self) -> bool:
        """True while removals within the window amount to a wipe."""
        with self._lock:
            return self._burst.wiped(self._clock())

    def held(self) -> list[Key]:
        with self._lock:
            return sorted(self._kept.held)

    def preheld(self, since: dict[Key, float]) -> None:
        """Before the first read: what a predecessor held and since when (this clock), from
        the last catalog it kept (:mod:`~discovery.watcher.remember`). Those the first read
        lacks are held at once, from then, whatever the rule says of the read: its ``hold``
        (twice at most) counts from the first hold, across restarts."""
        with self._lock:
            self._preheld = dict(since)

    def held_since(self) -> dict[Key, float]:
        """What it holds, and since when (its clock)."""
        with self._lock:
            return {k: e.held_since for k, e in self._kept.entries.items()
                    if e.held_since is not None}

    def held_services(self) -> list[str]:
        """The services with an instance held (/v1/health)."""
        with self._lock:
            return sorted({k[0] for k in self._kept.held})

    # ---- the rules --------------------------------------------------------------------------
    def _put(self, change: Change, now: float) -> list[Change]:
        assert change.instance is not None
        current = self.catalog.get(change.key)
        if current is not None and foreign_drain(current, change.instance):
            return self._take_out(change, current, now)
        if (entry := self._kept.pop(change.key)) and entry.held_since is not None:  # back
            self._back = now
        self._burst.applied.pop(change.key, None)  # written since: never put back
        if change.instance.serving:
            self._burst.refilled({change.key[0]})
        if change.key[0] in self._kept.by_service:  # its held ones may go once the wipe is over
            self._look_at.add(change.key[0])
        return [change]

    def _delete(self, change: Change, now: float) -> list[Change]:
        current = self.catalog.get(change.key)
        if current is None:
            return [change]
        if change.drained or current.state is not State.UP:  # drained first: a departure
            self._kept.pop(change.key)
            self._burst.applied.pop(change.key, None)
            return [change]
        return self._take_out(change, current, now)

    def _take_out(self, change: Change, current: Instance, now: float) -> list[Change]:
        """The up instance ``current`` removed (a delete), or drained by another writer (a put):
        counted in the burst, and applied now, or kept in the catalog as it is until
        :meth:`due` decides (its service's last, or a wipe); a put kept is applied then."""
        key = change.key
        last = not self._kept.has_other(key, current)
        engaged = self._burst.note(now, {key: current.node}, {key[0]: current.node}
                                   if last and current.serving and key not in self._kept.entries
                                   else {})
        if not (self._burst.wiped(now) or last):
            self._kept.pop(key)
            self._burst.applied[key] = (current, change, now)
            return [change]
        self._keep(key, current, now, change if change.kind == "put" else None)
        # stays in the catalog until due() decides; what the wipe took before is put back
        return [Change("put", key=k, instance=inst, revision=self.catalog.revision, put_back=True)
                for k, inst in self._put_back(now, engaged, lambda k: False).items()]

    def _put_back(self, now: float, engaged: bool, written: Callable[[Key], bool],
                  gone: bool = False) -> dict[Key, Instance]:
        """A burst just seen as a wipe: the removals it applied before (each left its service
        another instance) go back in the catalog, held as the rest (a prefix delete reaches
        the watcher in key order: the services first in it would have been left with one
        instance on every host until their agents wrote them back). Not those ``written``
        since (a reset's: in the registry again, or not read), or kept already; ``gone``: they
        are not in the registry (a reset's), so a drain put back goes as a delete."""
        back: dict[Key, Instance] = {}
        for key, (inst, change, since) in (self._burst.applied.items() if engaged else ()):
            after = change.instance if change.kind == "put" else None
            if written(key) or key in self._kept.entries or self.catalog.get(key) != after:
                continue
            entry = Deferred(inst, now, since,
                             pending=change if after is not None and not gone else None)
            self._kept.add(key, entry)
            self._kept.hold(key, entry, now, self.settings.hold)
            back[key] = inst
        if engaged:
            self._burst.applied = {}
        if back:
            log.warning("wipe guard: %d instances removed earlier in this wipe put back, held",
                        len(back))
        return back

    def _keep(self, key: Key, current: Instance, now: float, pending: Change | None) -> None:
        if (entry := self._kept.entries.get(key)) is None:
            self._kept.add(key, Deferred(current, now + self.settings.settle, now,
                                       pending=pending))
        else:
            self._kept.tally(key[0], entry, -1)
            entry.pending = pending  # the latest: a delete after a drain is a removal
            self._kept.tally(key[0], entry, 1)

    def _reset(self, change: Change, now: float) -> Change:
        snapshot = change.snapshot or Snapshot()
        before = {i.key: i for i in self.catalog.instances()}
        # not read (withheld, unreadable): the catalog keeps them as they are (and their
        # services what of them is up, and serves)
        missing = [i for k, i in before.items() if k not in snapshot.instances]
        # of services no longer followed (a SIGHUP dropped them): left, not removed (a fleet's
        # config push counted them as a wipe on every host at once, and held them)
        gone = [i.key for i in missing if not snapshot.keeps(i.key) and snapshot.covers(i.service)]
        for key in [k for k in self._burst.applied if not snapshot.covers(k[0])]:
            del self._burst.applied[key]  # (never put back: not followed any more)
        kept = [i for i in missing if snapshot.keeps(i.key)]
        # drained by another writer: taken out as if gone, kept as they were while held
        drained = {k: i for k, i in snapshot.instances.items()
                   if (b := before.get(k)) is not None and foreign_drain(b, i)}
        # what it holds already is not removed again (a reset after a wipe re-engaged it)
        up_gone = [k for k in [*gone, *drained]
                   if before[k].state is State.UP and k not in self._kept.entries]
        keep = dict(snapshot.instances)
        after = [*keep.values(), *kept]
        up_after = {i.service for i in after if i.state is State.UP}
        serving_after = {i.service for i in after if i.serving}
        self._burst.refilled(serving_after)
        engaged = bool(up_gone) and self._burst.note(
            now, {k: before[k].node for k in up_gone},
            {k[0]: before[k].node for k in up_gone
             if before[k].serving and k[0] not in serving_after})
        wiped = self._burst.wiped(now)

        def kept_out(key: Key) -> bool:  # held, or its service's last (of what it did)
            inst = before[key]
            return inst.state is State.UP and (wiped or key in preheld or key[0] not in (
                serving_after if inst.serving else up_after))

        preheld, self._preheld = self._preheld, {}
        for key in filter(kept_out, gone):
            keep[key] = before[key]
            self._keep(key, before[key], now, None)  # a held drain gone since: a removal
        held = set(filter(kept_out, drained))
        for key in held:
            keep[key] = before[key]
            self._keep(key, before[key], now, Change("put", key=key, instance=drained[key],
                                                     revision=snapshot.revision))
        self._hold_preheld(preheld, snapshot, now)
        keep.update(self._put_back(now, engaged, lambda k: k in snapshot.instances
                                   or snapshot.keeps(k) or not snapshot.covers(k[0]), gone=True))
        for key in up_gone:  # those it applies (each left its service another): put back if
            if key not in (held if key in drained else keep):  # the burst turns out a wipe
                self._burst.applied[key] = (before[key], Change(
                    "put", key=key, instance=drained[key], revision=snapshot.revision)
                    if key in drained else Change("delete", key=key), now)
        # back in the registry (unreadable: there, the catalog keeps what it had), or gone
        # from the catalog the reset makes: nothing to hold
        for key in [k for k in self._kept.entries if (k in snapshot.instances and k not in held)
                    or k in snapshot.unreadable
                    or (k not in keep and k[0] not in snapshot.withheld)]:
            if (was := self._kept.pop(key)) and was.held_since is not None and key in keep \
                    and key not in drained:
                self._back = now  # back
        if len(keep) == len(snapshot.instances) and not held:
            return change
        return replace(change, snapshot=replace(snapshot, instances=keep))

    # ---- helpers ---------------------------------------------------------------------------
    def _hold_preheld(self, preheld: dict[Key, float], snapshot: Snapshot, now: float) -> None:
        """What a predecessor held (:meth:`preheld`): held from then if kept out now (gone or
        drained); one back in the read counts as come back (``_back``: the others wait on, as
        they would have); and the next :meth:`due` looks at everything held, as at the end of
        a wipe (one whose service has another serving again goes, as it would have)."""
        kept = [k for k in preheld if k in self._kept.entries]
        for key in kept:
            self._kept.hold(key, self._kept.entries[key], min(preheld[key], now),
                            self.settings.hold)
        if any(k in snapshot.instances for k in preheld):
            self._back = now
        if kept:
            self._was_wiped = True
            log.warning("wipe guard: holding %d instances its predecessor held (the first "
                        "since %.0fs), %d back", len(kept),
                        max(now - min(preheld[k], now) for k in kept),
                        sum(k in snapshot.instances for k in preheld))

    def _release(self, key: Key) -> Change:
        entry = self._kept.pop(key)
        assert entry is not None
        if entry.held_since is not None:
            log.debug("wipe guard: released %s/%s after %.1fs", *key,
                      self._clock() - entry.held_since)
        if entry.pending is not None:  # a drain by another writer, not undone meanwhile
            return replace(entry.pending, revision=self.catalog.revision)
        return Change("delete", key=key, revision=self.catalog.revision)
