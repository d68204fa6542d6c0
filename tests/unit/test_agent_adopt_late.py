"""An agent whose registry did not answer at its start adopts this node's entries at its first
node read that succeeds (agent/registrations.py: ``adopt_late``).

Before, ``load()`` failed, nothing was adopted ever after, and the first reconcile after the
registry's return drained and deleted the earlier run's entries of containers whose checks
had not reached ``rise`` yet (or still warming up): serving containers out of rotation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from discovery.agent.spec import CheckResult, CheckSpec
from discovery.errors import RegistryUnavailable
from discovery.model import State
from tests.unit.test_agent_docker import FakeRegistry, Setup, agent_on

KEY = ("xsvc", "n1:" + "x" * 12 + ":80")


@pytest.fixture
def slow_rise(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """Its checks pass, but take 10 runs a minute apart to make an instance healthy."""
    with agent_on(monkeypatch, FakeRegistry(), CheckSpec(type="none", interval=60, rise=10)) \
            as made:
        yield made


def listed_with_an_earlier_runs_entry(setup: Setup) -> None:
    """Container x listed (its check short of rise), its instance in the registry already, as
    an earlier run of the agent left it; the read at start failed (load() never succeeded)."""
    x = setup.run("x", "xsvc")
    setup.agent._on_sync([x])
    assert setup.agent.registrations.flush(5)
    setup.registry.data[KEY] = setup.agent._tracked[x["Id"]].instances[KEY]


def test_the_first_node_read_adopts_what_the_read_at_start_missed(slow_rise: Setup) -> None:
    listed_with_an_earlier_runs_entry(slow_rise)
    assert slow_rise.agent.reconcile() and slow_rise.agent.registrations.flush(5)
    assert ("delete", KEY) not in slow_rise.registry.log
    assert slow_rise.registry.data[KEY].state is State.UP  # (written again: now its own)
    assert slow_rise.agent._tracked["x" * 64].runners[KEY].healthy  # as if started adopted


def test_an_entry_seen_after_the_first_read_is_not_adopted(slow_rise: Setup) -> None:
    """Adoption is of the first read only: a later entry of a container short of rise is
    another writer's (or one deleted since): the reconcile removes it, as before."""
    assert slow_rise.agent._synced is False
    slow_rise.agent._synced = True  # Docker listed (nothing running)
    assert slow_rise.agent.reconcile()  # the first read: nothing of ours
    listed_with_an_earlier_runs_entry(slow_rise)
    assert slow_rise.agent.reconcile() and slow_rise.agent.registrations.flush(5)
    assert slow_rise.registry.log[-2:] == [("put", KEY, "draining"), ("delete", KEY)]


class Failing:
    def run(self) -> CheckResult:
        return CheckResult(False, "exit 1: broken")


def test_a_check_failing_since_the_start_is_not_made_healthy_by_adoption(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's check failed run after run while the registry was away: the earlier
    run's entry is not adopted (it was set healthy and written up again, routed until ``fall``
    more failures); it is drained and deleted as before the adoption came in."""
    with agent_on(monkeypatch, FakeRegistry(),
                  CheckSpec(type="none", interval=60, rise=2, fall=3)) as setup:
        x = setup.run("x", "xsvc")
        setup.agent._on_sync([x])
        assert setup.agent.registrations.flush(5)
        runner = setup.agent._tracked[x["Id"]].runners[KEY]
        runner.check = Failing()  # type: ignore[assignment]
        for _ in range(5):
            runner.run_once()
        setup.registry.data[KEY] = setup.agent._tracked[x["Id"]].instances[KEY]
        assert setup.agent.reconcile() and setup.agent.registrations.flush(5)
        assert not runner.healthy
        assert setup.registry.log[-2:] == [("put", KEY, "draining"), ("delete", KEY)]


def test_what_this_process_wrote_itself_is_not_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read at start failed, the registry came back and this run registered x itself; then
    x's check failed while a blip failed its delete: the next node read shows this process's
    own record, which was 'adopted' and its failing check set healthy again."""

    class Flaky(FakeRegistry):
        down = False

        def register(self, inst: Any) -> None:
            if self.down:
                raise RegistryUnavailable("down")
            super().register(inst)

        def deregister(self, service: str, iid: str) -> None:
            if self.down:
                raise RegistryUnavailable("down")
            super().deregister(service, iid)

    registry = Flaky()
    with agent_on(monkeypatch, registry,
                  CheckSpec(type="none", interval=60, rise=1, fall=2)) as setup:
        x = setup.run("x", "xsvc")
        setup.agent._on_sync([x])
        setup.wait_services(["xsvc"])
        runner = setup.agent._tracked[x["Id"]].runners[KEY]
        runner.check = Failing()  # type: ignore[assignment]
        registry.down = True
        runner.run_once()
        runner.run_once()
        setup.agent.registrations.flush(5)
        assert not runner.healthy and KEY in registry.data  # (its delete failed)
        registry.down = False
        assert setup.agent.reconcile() and setup.agent.registrations.flush(5)
        assert not runner.healthy and KEY not in registry.data


def test_a_no_result_after_a_failure_does_not_hide_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exec check failing, then one run with dockerd away ("no result"): the failure is
    still the check's last result, and late adoption does not set it healthy."""
    with agent_on(monkeypatch, FakeRegistry(),
                  CheckSpec(type="none", interval=60, rise=2, fall=3)) as setup:
        x = setup.run("x", "xsvc")
        setup.agent._on_sync([x])
        assert setup.agent.registrations.flush(5)
        tracked = setup.agent._tracked[x["Id"]]
        runner = tracked.runners[KEY]
        runner.check = Failing()  # type: ignore[assignment]
        runner.run_once()

        class Away:
            def run(self) -> CheckResult:
                return CheckResult(False, "no result: dockerd unreachable", unknown=True)

        runner.check = Away()  # type: ignore[assignment]
        runner.run_once()
        assert tracked.failed(KEY)
        setup.registry.data[KEY] = tracked.instances[KEY]
        assert setup.agent.reconcile() and setup.agent.registrations.flush(5)
        assert setup.registry.log[-2:] == [("put", KEY, "draining"), ("delete", KEY)]
