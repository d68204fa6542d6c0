"""An agent's departures are drained first (agent/registrations.py), and a watcher's wipe guard
(watcher/guard.py) never counts or holds them.

A rolling replacement of a small service removes more than half of a small catalog within the
guard's window. Before, its deletes of ``up`` instances read as a registry-side wipe: the
guard held the stopped containers in rotation and requests failed (bench/routing.py churn,
27-76 failed of ~10,000 through the runtime API). Now the agent writes ``draining``, then
deletes; only deletes of ``up`` entries (a revoked lease, a deleted prefix) count as a wipe.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from discovery.agent.history import Cause, History
from discovery.agent.registrations import Registrations
from discovery.agent.wishes import Wish
from discovery.errors import RegistryUnavailable
from discovery.metrics import Metrics
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry import Change
from discovery.registry.base import Snapshot
from discovery.watcher.guard import WipeGuard
from discovery.watcher.guard_burst import foreign_drain


class Recorder:
    """The writes a registry got, in order."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []

    def register(self, instance: Instance) -> None:
        self.writes.append(("put", instance))

    def deregister(self, service: str, instance_id: str) -> None:
        self.writes.append(("delete", (service, instance_id)))


def inst(service: str, n: int, state: State = State.UP) -> Instance:
    return Instance(service=service, id=f"h1:{n:012x}:80", node="h1",
                    address="192.0.2.1", port=8000 + n, state=state)


def registrations(reg: Recorder | None = None) -> tuple[Registrations, Recorder]:
    reg = reg or Recorder()
    return Registrations(reg, "h1", Metrics(), History(), lambda: None), reg  # type: ignore[arg-type]


def test_an_up_instance_leaves_draining_then_deleted() -> None:
    regs, reg = registrations()
    a = inst("a", 1)
    regs.write(a.key, a, Cause("check", at=time.time() - 100))  # registered 100 s ago
    kill = Cause("kill")
    regs.write(a.key, None, kill)
    kinds = [(k, v.state if k == "put" else v) for k, v in reg.writes[1:]]
    assert kinds == [("put", State.DRAINING), ("delete", a.key)]
    assert a.key not in regs.written
    draining = reg.writes[1][1]  # stamped for this write: watchers time its propagation from
    assert draining.seen_at == kill.at and draining.written_at >= kill.at  # it, not the age


def test_a_draining_or_adopted_instance_is_only_deleted() -> None:
    regs, reg = registrations()
    d = inst("a", 1, State.DRAINING)  # in maintenance: already drained
    regs.write(d.key, d)
    regs.adopt.add(inst("a", 2).key)  # an earlier run's, never written by this one
    regs.write(d.key, None)
    regs.write(inst("a", 2).key, None)
    assert [k for k, _ in reg.writes] == ["put", "delete", "delete"]


def test_a_write_after_the_reconciles_read_is_not_taken_for_lost() -> None:
    """The reconcile reads the node, a check passes and its instance is written, then the
    reconcile compares: the read does not show that write, which is newer; not written again
    (it was, as "lost": two writes per instance at every agent's start). The delete side too."""
    import time

    regs, reg = registrations()
    a, b = inst("a", 1), inst("a", 2)
    regs.write(b.key, b)
    read_at = time.monotonic()
    snap = Snapshot({b.key: b})  # read now: b there, a not yet
    regs.write(a.key, a, Cause("check"))  # a registered after the read began
    regs.write(b.key, None, Cause("kill"))  # b drained and deleted after it
    before = len(reg.writes)
    regs.reconcile(snap, {a.key: a}, read_at)
    assert regs.flush(5)  # its writes: made by a thread of their own
    assert reg.writes[before:] == []
    regs.reconcile(Snapshot({a.key: a}), {a.key: a}, time.monotonic())  # the next one: at rest
    assert regs.flush(5)  # its writes: made by a thread of their own
    assert reg.writes[before:] == [] and set(regs.written) == {a.key}
    read_at = time.monotonic()
    regs.write(a.key, a, Cause("check"))  # the same again (a check result): no write...
    regs.reconcile(Snapshot(), {a.key: a}, read_at)  # ...so its loss is repaired at once
    assert regs.flush(5)  # its writes: made by a thread of their own
    assert [k for k, _ in reg.writes[before:]] == ["put"]


def feed(catalog: Catalog, guard: WipeGuard, change: Change) -> None:
    for c in guard.filter(change):
        catalog.apply(c)


def replace_all(drain_first: bool) -> tuple[Catalog, WipeGuard]:
    """Each of a 4-instance service's instances replaced, 0.3 s apart (start the new one, stop
    the old one): 3 of a 5-instance catalog removed within the guard's 2 s window."""
    now = [100.0]
    old = [inst("a", n) for n in range(1, 5)]
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in old}, revision=1))
    guard = WipeGuard(catalog, clock=lambda: now[0])
    for n, o in enumerate(old, start=11):
        feed(catalog, guard, Change("put", key=inst("a", n).key, instance=inst("a", n),
                                    revision=n))
        if drain_first:  # as the agent leaves it
            feed(catalog, guard, Change("put", key=o.key, instance=o.with_state(State.DRAINING),
                                        revision=n))
        feed(catalog, guard, Change("delete", key=o.key, revision=n))
        now[0] += 0.3
        for c in guard.due():
            catalog.apply(c)
    return catalog, guard


def test_a_fast_rolling_replacement_of_the_only_service_is_never_held() -> None:
    catalog, guard = replace_all(drain_first=True)
    assert guard.status.engaged == 0 and guard.status.holding == 0
    assert {i.id for i in catalog.instances("a")} == {inst("a", n).id for n in range(11, 15)}


def test_the_same_replacement_with_up_deletes_reads_as_a_wipe() -> None:
    """What the guard saw before the agent drained first (and still sees of a real wipe)."""
    catalog, guard = replace_all(drain_first=False)
    assert guard.status.engaged == 1 and guard.status.holding >= 1
    assert len(catalog.instances("a")) > 4  # stopped ones held in rotation


class Lossy(Recorder):
    """A registry whose registrations land but whose answers are lost, while ``lossy``."""

    lossy = True

    def register(self, instance: Instance) -> None:
        super().register(instance)
        if self.lossy:
            from discovery.errors import RegistryUnavailable

            raise RegistryUnavailable("the answer was lost")


def test_a_registration_whose_answer_was_lost_is_deleted_when_not_wanted() -> None:
    """A failed registration may have landed (ZooKeeper: a node created whose answer was
    lost): once the instance is not wanted any more it is deleted anyway, as the reconcile,
    which reads the node's index, may not see it (Nerve's sequential node, a take-over)."""
    reg = Lossy()
    regs = Registrations(reg, "h1", Metrics(), History(), lambda: None)  # type: ignore[arg-type]
    a, b = inst("a", 1), inst("a", 2)
    regs.write(a.key, a)
    regs.write(a.key, None)  # the container stopped before any write succeeded
    assert reg.writes[-1] == ("delete", a.key) and not regs.unsure
    regs.write(b.key, b)
    reg.lossy = False
    regs.write(b.key, b)  # written again (the reconcile): no longer unsure
    assert not regs.unsure and b.key in regs.written
    reg.lossy = True
    c = inst("a", 3)
    regs.write(c.key, c)  # lost again; the reconcile finds c neither wanted nor indexed
    regs.reconcile(Snapshot(instances={b.key: b}), {b.key: b})
    assert regs.flush(5)  # its writes: made by a thread of their own
    assert ("delete", c.key) in reg.writes and not regs.unsure


def test_a_refused_registration_is_not_deleted_later() -> None:
    """Refused (a role without write on the service, a ZooKeeper ACL): certainly not written,
    so nothing to delete once it is not wanted (its delete would be refused every round)."""
    from discovery.errors import RegistryDenied

    class Refusing(Recorder):
        def register(self, instance: Instance) -> None:
            super().register(instance)
            raise RegistryDenied("refused")

    reg = Refusing()
    regs = Registrations(reg, "h1", Metrics(), History(), lambda: None)  # type: ignore[arg-type]
    a = inst("a", 1)
    regs.write(a.key, a)
    regs.write(a.key, None)
    assert [k for k, _ in reg.writes] == ["put"] and not regs.unsure



def test_a_forced_write_is_stamped_after_the_one_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconcile forces a write of what the registry lost or holds changed (another
    writer's value, the stamp it read kept): stamped after the agent's last write even if the
    clock stepped back since, or every watcher would take the agent's own drain for another
    writer's (watcher/guard_burst.foreign_drain) and hold it."""
    regs, reg = registrations()
    a = inst("a", 1)
    regs.write(a.key, a)
    first = reg.writes[0][1]
    monkeypatch.setattr(time, "time", lambda: first.written_at - 100.0)  # a step back
    regs._write_wish(a.key, Wish(a.with_state(State.DRAINING), None, force=True))
    forced = reg.writes[1][1]
    assert forced.written_at > first.written_at and not foreign_drain(first, forced)


class Flaky(Recorder):
    """Its next register's answer is lost (the write may have landed: recorded)."""

    lose = False

    def register(self, instance: Instance) -> None:
        super().register(instance)
        if self.lose:
            self.lose = False
            raise RegistryUnavailable("answer lost")


def test_every_write_is_stamped_after_those_whose_answer_was_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced write whose answer was lost may have landed: the next write of the key (the
    reconcile's retry, a departure's drain) is stamped after it, the clock stepped back or not,
    and the departure still drains first."""
    regs, reg = registrations(flaky := Flaky())
    a = inst("a", 1)
    regs.write(a.key, a)
    first = reg.writes[0][1]
    monkeypatch.setattr(time, "time", lambda: first.written_at - 100.0)  # a step back
    flaky.lose = True
    regs._write_wish(a.key, Wish(replace(a, weight=0), None, force=True))
    regs._write_wish(a.key, Wish(replace(a, weight=0), None, force=True))  # the retry
    regs.write(a.key, None)
    stamps = [v.written_at for k, v in reg.writes if k == "put"]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    assert [k for k, _ in reg.writes] == ["put", "put", "put", "put", "delete"]


def test_a_reconciles_write_is_stamped_after_the_registrys_value() -> None:
    """An instance adopted from an earlier run, or written back by the host's registry,
    carries a stamp the agent never wrote: its next write comes after it."""
    regs, reg = registrations()
    a = inst("a", 1)
    there = replace(a, written_at=time.time() + 100.0)  # (another run's clock ahead)
    with regs.turn():
        regs.reconcile(Snapshot({a.key: replace(there, weight=0)}, 1), {a.key: a})
    assert regs.flush(5)
    assert reg.writes[-1][1].written_at > there.written_at
