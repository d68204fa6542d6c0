"""An entry a registry owns, deleted by another writer under its live lease or session, is
written back by that registry within its ``spread=`` when one of its watches saw it go
(``discovery up``: the agent and the watcher share one registry client); its own
deregister is not undone, and a registry with no watch leaves it to its agent's reconcile."""

from __future__ import annotations

import time

import pytest

from discovery.registry import RegistryURL
from tests.harness.fleet import close_raw, delete_services, index_paths, raw_client
from tests.harness.servers import wait_until
from tests.integration.test_registry_contract import Follower, OpenReg, inst, open_reg

__all__ = ["open_reg"]
pytestmark = pytest.mark.integration

SPREAD = 0.5  # the URL's spread=: each entry is written back after a random wait within it


def test_what_another_writer_deleted_is_written_back_once(registry_url: str,
                                                          open_reg: OpenReg) -> None:
    url_s = f"{registry_url}?spread={SPREAD}"
    agent, other, reader = open_reg(url_s), open_reg(url_s), open_reg(url_s)
    ours = [inst(1), inst(2, service="api"), inst(3)]
    theirs = inst(9, id="node-2:000000000009:80", node="node-2")
    for one in ours:
        agent.register(one)
    other.register(theirs)  # a registry with no watch (an agent alone)
    follower = Follower().follow(agent)
    restorer = agent._restorer  # type: ignore[attr-defined]

    agent.deregister(*ours[2].key)  # our own delete: the watch sees it, nothing is scheduled
    wait_until(lambda: ours[2].key not in follower.state, 10, "our own delete seen")
    assert not restorer._due and restorer.restored == 0

    assert delete_services(url_s) == 3  # ours (2) and theirs
    gone = time.monotonic()
    wait_until(lambda: not reader.snapshot().instances, 5, "the hand delete seen")
    expected = {i.key: i for i in ours[:2]}
    wait_until(lambda: reader.snapshot().instances == expected, SPREAD + 2.0,
               "our two instances written back, nothing else")
    took = time.monotonic() - gone
    assert took <= SPREAD + 1.0, took
    follower.wait_state(expected, timeout=5)
    assert restorer.restored == 2  # each written once: found missing, the write conditional
    # written back with its index entry (a restarted agent finds it through it)
    url = RegistryURL.parse(url_s)
    assert index_paths(url_s, "node-1") >= {f"{url.prefix}/nodes/node-1/{s}/{i}"
                                            for s, i in expected}
    client = raw_client(url_s)  # a second hand delete, of one: back again, and only it
    try:
        client.delete(url.key(*ours[0].key))
    finally:
        close_raw(client)
    wait_until(lambda: restorer.restored == 3, SPREAD + 2.0, "written back again")
    assert reader.snapshot().instances == expected
    assert theirs.key not in reader.snapshot().instances  # no watch: its agent's reconcile
