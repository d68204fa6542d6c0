"""The agent decides under its lock and writes outside it (agent/registrations.py).

Before, each registry write ran under the agent's lock: a write to a member that never
answered held every Docker event, check transition and ``PUT /v1/agent/maint`` for the
request's timeout (three such writes held the agent 14 s). Now a writer thread of its own
writes the newest wish of each key; whatever decides returns at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discovery.agent import core
from discovery.agent.registrations import Registrations
from discovery.agent.spec import CheckResult, CheckSpec
from discovery.model import Instance
from discovery.registry import Snapshot
from tests.unit.test_agent_docker import FakeRegistry, Setup, agent_on, later
from tests.unit.test_agent_reconnect import running
from tests.unit.test_agent_wishes import lost


class HeldRegistry(FakeRegistry):
    """Its first register waits for ``release`` (a member that does not answer), then
    ``outcome`` runs (raise to fail it); ``attempts`` counts every register."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.attempts = 0
        self.outcome: Callable[[], None] = lambda: None
        self.after: Callable[[], None] = lambda: None  # each later register

    def register(self, inst: Instance) -> None:
        self.attempts += 1
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
            self.outcome()
        else:
            self.after()
        super().register(inst)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    registry = HeldRegistry()
    with agent_on(monkeypatch, registry) as made:
        yield made
        registry.release.set()
        assert made.agent.registrations.flush(5)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, asserting it returned within ``seconds`` (run on a thread: a call
    that hangs fails the test instead of hanging it)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    return out[0]


def wait_pending(regs: Registrations, n: int) -> None:
    """Until ``n`` registrations are pending."""
    deadline = time.monotonic() + 5
    while True:
        if sum(w.instance is not None for _, w in regs._wishes.wished()[1:]) >= n:
            return
        assert time.monotonic() < deadline, regs._wishes.wished()
        time.sleep(0.01)


def hung_registration(setup: Setup, fail: bool = False) -> tuple[HeldRegistry, dict[str, Any]]:
    """alpha's container listed (the listing returns at once), its check passed and its
    registration hanging; with ``fail``, it and every later write get no answer."""
    reg = setup.registry
    assert isinstance(reg, HeldRegistry)
    if fail:
        reg.outcome = reg.after = lost
    attrs = setup.run("a", "alpha")
    within(1, lambda: setup.agent._on_sync(list(setup.docker.running.values())))
    assert reg.entered.wait(5)
    return reg, attrs


def test_a_write_in_flight_holds_no_event_check_or_maintenance(held: Setup) -> None:
    reg, a = hung_registration(held)
    b = held.run("b", "beta")
    within(1, lambda: held.event("start", b, flush=False))  # a Docker event: handled
    assert within(1, lambda: held.agent.set_maint(None, True))[0]  # maintenance: at once
    within(1, held.agent.checks)
    within(1, lambda: held.event("die", a, later(a), flush=False, exitCode="0"))
    assert held.registry.log == []  # nothing written yet: the first write still hangs
    reg.release.set()
    assert held.agent.registrations.flush(5)
    writes: dict[str, list[str]] = {}
    for kind, key, *state in held.registry.log:
        writes.setdefault(key[0], []).append(" ".join([kind, *state]))
    # alpha written (its hung write), then drained and deleted; beta in maintenance
    assert writes == {"alpha": ["put up", "put draining", "delete"], "beta": ["put draining"]}


def test_only_the_newest_wish_of_a_key_is_written(held: Setup) -> None:
    """Wishes that came while a write hung: the newest of each key, once."""
    reg, _ = hung_registration(held)
    for on in (True, False, True, False, True):
        held.agent.set_maint(None, on)
    reg.release.set()
    assert held.agent.registrations.flush(5)
    assert [(k, s) for k, _, s in held.registry.log] == [("put", "up"), ("put", "draining")]


def test_a_lost_link_leaves_the_other_pending_writes_to_the_reconcile(
        held: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """Each write to a member that never answers waits its timeout: after one, the writes
    pending are left to the reconcile at the registry's return, not tried one by one."""
    reg, _ = hung_registration(held, fail=True)
    for cid, service in (("b", "beta"), ("c", "gamma"), ("d", "delta")):
        held.event("start", held.run(cid, service), flush=False)
    wait_pending(held.agent.registrations, 3)  # their checks passed
    with caplog.at_level(logging.WARNING):
        reg.release.set()
        assert held.agent.registrations.flush(5)
    assert reg.attempts == 1 and held.registry.log == []
    assert "3 more registry writes left to the reconcile" in caplog.text
    assert held.agent.registrations.write_failed
    reg.outcome = reg.after = lambda: None  # back: the reconcile writes all four
    assert held.agent.reconcile()
    assert held.services() == ["alpha", "beta", "delta", "gamma"]


def test_a_reload_keeps_healthy_an_instance_whose_registration_is_pending(
        held: Setup) -> None:
    """A SIGHUP re-checks every instance, those registered starting healthy; one whose
    registration is under way or pending counts as registered (it flapped down, then up)."""
    reg, _ = hung_registration(held)
    assert {key[0] for key in held.agent.registrations.held()} == {"alpha"}  # under way
    assert held.agent._reload(held.agent.config)
    reg.release.set()
    assert held.agent.registrations.flush(5)
    assert [(k, s) for k, _, s in held.registry.log] == [("put", "up")]  # no delete


def test_a_departure_is_not_undone_by_a_write_that_was_under_way(held: Setup) -> None:
    """The container died while its registration hung: the write, told last, does not bring
    it back to life in the instance's history (it showed live and up for good)."""
    reg, a = hung_registration(held)
    held.event("die", a, later(a), flush=False, exitCode="1")
    reg.release.set()
    assert held.agent.registrations.flush(5)
    [history] = held.agent.history.query(service="alpha")
    assert not history["live"] and history["state"] == "gone", history
    assert held.services() == []


class Failing:
    """A check that never passes."""

    def run(self) -> CheckResult:
        return CheckResult(False, "connection refused")


def test_an_adopted_instance_restarted_while_its_delete_is_pending_starts_afresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier run's instance (adopted at a hand-over, its check starting healthy) whose
    container restarted, seen by a Docker listing while another write hangs: its adoption
    ends with the delete decided, not written (the new run was taken for adopted: healthy at
    once, no warm-up, and the old run's record never deleted: up while it restarted)."""
    monkeypatch.setattr(core, "build_check", lambda _spec, _target: Failing())
    registry = FakeRegistry()
    with agent_on(monkeypatch, registry, CheckSpec(type="tcp", interval=60)) as made:
        attrs = made.run("a", "alpha")
        made.agent._on_sync([attrs])  # not healthy: not registered
        earlier = made.agent._tracked.pop(attrs["Id"])
        earlier.stop_runners()
        [(key, inst)] = earlier.instances.items()
        registry.data[key] = inst  # as after a hand-over: the predecessor's, adopted
        made.agent.registrations.load()
        made.agent._on_sync([attrs])
        assert made.services() == ["alpha"]  # adopted: healthy at once
        attrs["State"]["StartedAt"] = "2024-01-01T00:01:00.000000000Z"  # restarted
        with made.agent.registrations.turn():  # another write under way
            made.agent._on_sync([attrs])
        assert made.services() == [] and registry.log[-1] == ("delete", key)
        [tracked] = made.agent._tracked.values()
        assert not tracked.runners[key].healthy


def test_the_writes_waiting_on_the_registry_are_a_metric(held: Setup) -> None:
    """``discovery_agent_writes_pending``: the one under way and those behind it."""
    metrics = held.agent.metrics
    assert metrics.registry.get_sample_value("discovery_agent_writes_pending") == 0
    reg, _ = hung_registration(held)
    held.agent.set_maint(None, True)  # alpha's draining, behind its registration
    held.event("start", held.run("b", "beta"), flush=False)
    wait_pending(held.agent.registrations, 2)  # beta's check passed too
    assert metrics.registry.get_sample_value("discovery_agent_writes_pending") == 3
    reg.release.set()
    assert held.agent.registrations.flush(5)
    assert metrics.registry.get_sample_value("discovery_agent_writes_pending") == 0


def test_a_registration_that_lands_after_its_containers_delete_is_looked_for_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """alpha's registration gets no answer (0.3 s: a member that stalls) and its container
    dies meanwhile; a reconcile deletes it (it may have landed). The stalled put then lands:
    one more reconcile, twice its wait after the delete (±10 %), deletes it again, and it is
    the first read after it landed. Before, the dead container stayed registered ``up``
    until the resync (an hour here; 30 s by default)."""
    reads: list[float] = []
    deletes: list[float] = []

    class Stalling(HeldRegistry):
        def node_snapshot(self, node: str) -> Snapshot:
            reads.append(time.monotonic())
            return super().node_snapshot(node)

        def deregister(self, service: str, iid: str) -> None:
            deletes.append(time.monotonic())
            super().deregister(service, iid)

        def close(self, revoke: bool = True) -> None:
            pass

    def reconciles() -> int:
        return sum(r.getMessage().startswith("reconcile done") for r in caplog.records)

    registry = Stalling()
    registry.outcome = lost
    with agent_on(monkeypatch, registry) as made, running(made.agent), \
            caplog.at_level(logging.DEBUG, logger="discovery.agent.registrations"):
        _, a = hung_registration(made)  # Docker listed: a reconcile reads, then waits for it
        made.event("die", a, later(a), flush=False, exitCode="1")
        time.sleep(0.3)  # the member stalls
        registry.release.set()
        deadline = time.monotonic() + 5
        # that reconcile deletes alpha; the failure woke a second one
        while reconciles() < 2 or not registry.log:
            assert time.monotonic() < deadline, (reconciles(), registry.log)
            time.sleep(0.005)
        assert made.agent.registrations.flush(5)
        [(kind, key)], [deleted] = registry.log, deletes
        assert kind == "delete" and not made.agent._tracked
        landed = time.monotonic()
        registry.data[key] = Instance(service=key[0], id=key[1], node="n1",
                                      address="127.0.0.1", port=80, registered_at=1.0)
        while registry.data:  # the stalled put, landed: deleted again
            assert time.monotonic() < deadline, registry.data
            time.sleep(0.005)
        again = time.monotonic() - deleted
    [first, *_] = [t - deleted for t in reads if t > landed]
    assert 0.5 <= first <= again <= 1.5, (first, again)
    assert "whose answer was lost may still land" in caplog.text


def test_an_entry_of_its_node_with_no_lease_or_session_is_written_again() -> None:
    """Written by hand with no lease (etcd) or as a node of no session (ZooKeeper), the same
    value would outlive the host: the reconcile writes it again (onto its lease or session),
    once; an entry that is the agent's own is not written again."""
    from discovery.agent.history import Cause, History
    from discovery.metrics import Metrics

    reg = FakeRegistry()
    regs = Registrations(reg, "h1", Metrics(), History(), lambda: None)  # type: ignore[arg-type]
    inst = Instance(service="web", id="h1:000000000001:80", node="h1", address="127.0.0.1",
                    port=8001)
    regs.write(inst.key, inst, Cause("check"))
    try:
        with regs.turn():
            regs.reconcile(reg.node_snapshot("h1"), {inst.key: inst})  # the agent's own
        assert regs.flush(5) and [e[0] for e in reg.log] == ["put"]
        by_hand = Snapshot(dict(reg.data), unowned=frozenset({inst.key}))
        with regs.turn():
            regs.reconcile(by_hand, {inst.key: inst})
        assert regs.flush(5) and [e[0] for e in reg.log] == ["put", "put"]
    finally:
        regs.stop(revoke=False)
