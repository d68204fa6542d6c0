"""``discovery maint``'s two kinds, as in Consul: the whole node's and an instance's own are
apart, and the answer names what changed and what another kind still holds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from discovery.model import State
from tests.unit.test_agent_docker import Setup, setup  # noqa: F401  (the fixture)


def states(s: Setup) -> dict[str, str]:
    assert s.agent.registrations.flush(5)  # the writes are made by a thread of their own
    return {key[0]: inst.state.value for key, inst in s.registry.data.items()}


def test_the_nodes_maintenance_and_an_instances_own_are_apart(setup: Setup) -> None:  # noqa: F811
    for cid, service in (("a", "asvc"), ("b", "bsvc")):
        setup.run(cid, service)
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["asvc", "bsvc"])
    ids = {key[0]: key[1] for key in setup.registry.data}
    a, b = ids["asvc"], ids["bsvc"]
    assert setup.agent.set_maint(a, True) == ([a], [])
    assert setup.agent.set_maint(None, True) == ([b], [])  # a was in maintenance already
    assert states(setup) == {"asvc": "draining", "bsvc": "draining"}
    # the node's off: b back; a stays, in its own maintenance (it was reported as back)
    assert setup.agent.set_maint(None, False) == ([b], [a])
    assert states(setup) == {"asvc": "draining", "bsvc": State.UP.value}
    setup.agent.set_maint(None, True)
    assert setup.agent.set_maint(a, False) == ([], [a])  # held by the node's
    assert setup.agent.set_maint(None, False) == ([a, b], [])
    assert states(setup) == {"asvc": "up", "bsvc": "up"}


def both_in_maintenance(s: Setup) -> dict[str, str]:
    """Containers a (asvc) and b (bsvc) registered, each instance in maintenance: their ids."""
    for cid, service in (("a", "asvc"), ("b", "bsvc")):
        s.run(cid, service)
    s.agent._on_sync(list(s.docker.running.values()))
    s.wait_services(["asvc", "bsvc"])
    ids = {key[0]: key[1] for key in s.registry.data}
    for iid in ids.values():
        s.agent.set_maint(iid, True)
    return ids


def test_a_removed_containers_maintenance_is_dropped(setup: Setup) -> None:  # noqa: F811
    """Its instances' ids never come back (a container id is made once); they were kept in
    the state file for good, up to 10,000, on a host whose containers come and go. A stopped
    container's are kept (it may start again, the same ids)."""
    ids = both_in_maintenance(setup)
    gone = setup.docker.running.pop("a" * 64)
    setup.event("die", gone, exitCode="0")
    assert setup.agent.maint.ids == set(ids.values())  # stopped: kept
    setup.event("destroy", gone)
    assert setup.agent.maint.ids == {ids["bsvc"]}


def test_the_maintenance_of_a_container_removed_while_the_agent_was_down_is_dropped(
        setup: Setup) -> None:  # noqa: F811
    """No ``destroy`` seen (the agent was down, or restarted since: Docker replays nothing
    then): a reconcile asks Docker about the containers in maintenance it does not track and
    drops those Docker no longer has; a stopped one's is kept."""
    ids = both_in_maintenance(setup)
    del setup.docker.running["a" * 64]  # removed, unseen
    setup.docker.running["b" * 64]["State"]["Running"] = False  # stopped: Docker has it
    setup.agent._on_sync([])  # the listing after the agent's restart: neither runs
    assert setup.agent.reconcile()
    assert setup.agent.maint.ids == {ids["bsvc"]}


class Hooked(set[str]):
    """Instance ids whose first iteration calls ``hook`` after its first item."""

    def __init__(self, items: set[str], hook: Callable[[], None]) -> None:
        super().__init__(items)
        self.hook: Callable[[], None] | None = hook

    def __iter__(self) -> Iterator[str]:
        for n, item in enumerate(super().__iter__()):
            if n == 1 and self.hook is not None:
                hook, self.hook = self.hook, None
                hook()
            yield item


def test_what_is_in_maintenance_is_read_under_the_agents_lock(setup: Setup) -> None:  # noqa: F811
    """``PUT /v1/agent/maint`` (and a ``destroy``) change the ids in place under the agent's
    lock; the reconcile's look at them (forget_removed) read them without it: "Set changed size
    during iteration", and the agent's run loop ended. Here a PUT comes while it reads."""
    ids = both_in_maintenance(setup)
    lock = setup.agent._lock
    came: list[bool] = []

    def put_meanwhile() -> None:  # another thread's PUT /v1/agent/maint, if the lock is free
        if lock.acquire(blocking=False):
            try:
                setup.agent.maint.set("n1:cccccccccccc:80", True)
            finally:
                lock.release()
            came.append(True)
        else:
            came.append(False)

    def hook() -> None:
        other = threading.Thread(target=put_meanwhile)
        other.start()
        other.join(5)

    setup.agent.maint.ids = Hooked(set(ids.values()), hook)
    setup.agent.forget_removed()
    assert came == [False]  # it waited for the lock
    assert setup.agent.maint.ids == set(ids.values())
