"""An agent whose registry did not answer at its start adopts this node's entries at its first
node read that succeeds (agent/registrations.py: ``adopt_late``).

Before, ``load()`` failed, nothing was adopted ever after, and the first reconcile after the
registry's return drained and deleted the earlier run's entries of containers whose checks
had not reached ``rise`` yet (or still warming up): serving containers out of rotation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from discovery.agent.spec import CheckSpec
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
