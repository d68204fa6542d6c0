"""A ZooKeeper registry with no watch of its own services (`discovery agent` alone) watches its
own nodes only (``zk_own``): after a cut link (the same session) one ``SetWatches`` re-arms
them, 3 to 20 resume spreads after the reconnect (``owned.OWN_LATER``: after a fleet's other
resumes, not among them), and a node deleted by hand during the cut is told then and written
back; after a session expiry, the recovery's transaction and one ``SetWatches`` (no read a
node)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from kazoo.client import KazooClient

from discovery.registry import Registry, RegistryURL, open_registry
from discovery.registry.owned import OWN_LATER
from tests.harness.fleet import foreign
from tests.harness.raw_clients import expire_zk_session
from tests.harness.servers import ServerCluster, unique_prefix, wait_until
from tests.harness.tcp_proxy import TcpProxy
from tests.integration.test_zk_persistent_watch import requests_of

pytestmark = pytest.mark.integration
SPREAD = 0.5


def test_own_nodes_deleted_during_a_cut_are_written_back_after_it(
        zk: ServerCluster, regs: list[Registry], monkeypatch: pytest.MonkeyPatch) -> None:
    url = zk.url(unique_prefix()) + f"?spread={SPREAD}"
    parsed = RegistryURL.parse(url)
    mine = [foreign(n, nodes=1, services=2) for n in range(4)]  # node f0, svc0 and svc1
    proxy = TcpProxy(parsed.hosts[0])
    look = KazooClient(hosts=f"{parsed.hosts[0][0]}:{parsed.hosts[0][1]}")
    look.start(10)
    try:
        reg = open_registry(proxy.url("zk", parsed.prefix) + f"?spread={SPREAD}", ttl=5)
        regs.append(reg)
        states: list[bool] = []
        reg.add_state_listener(states.append)
        for inst in mine:
            reg.register(inst)
        own = reg._restorer.own  # type: ignore[attr-defined]
        wait_until(lambda: own.holds, 5, "its nodes watched")
        restorer = reg._restorer  # type: ignore[attr-defined]
        sent = requests_of(reg, monkeypatch)
        gone, changed = mine[1], mine[2]
        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the link down")
            look.delete(parsed.key(*gone.key))  # by hand, while the host cannot see it
            look.set(parsed.key(*changed.key),  # (a set fires only from the zxid before it)
                     dataclasses.replace(changed, weight=0).to_json())
        wait_until(lambda: states[-1:] == [True], 10, "reconnected")
        back = time.monotonic()
        later = (OWN_LATER[0] * SPREAD, OWN_LATER[1] * SPREAD)  # 1.5 to 10 s
        wait_until(lambda: sent[:1] == ["SetWatches"], later[1] + 2.0, "re-armed")
        rearmed = time.monotonic() - back
        assert later[0] - 0.5 <= rearmed <= later[1] + 1.0, rearmed  # (back: polled after)
        wait_until(lambda: restorer.restored == 2, SPREAD + 2.0, "both written back")
        assert time.monotonic() - back <= rearmed + SPREAD + 1.0
        session = reg.client.client_id[0]  # type: ignore[attr-defined]
        assert look.exists(parsed.key(*gone.key)).ephemeralOwner == session
        assert json.loads(look.get(parsed.key(*changed.key))[0])["weight"] != 0
        # one SetWatches re-armed the 4; the two read (the deleted one: its data, then an
        # exists watch), each written back (a read first, then a create checking its index
        # node, or a set), each write firing its watch: read once more
        assert sent[0] == "SetWatches", sent
        assert sorted(sent[1:]) == sorted(["GetData", "Exists", "GetData", "Transaction",
                                           "GetData", "GetData", "GetData", "SetData",
                                           "GetData"]), sent
    finally:
        look.stop()
        look.close()
        proxy.close()


def test_after_a_session_expiry_one_request_rearms_them(
        zk: ServerCluster, regs: list[Registry], monkeypatch: pytest.MonkeyPatch) -> None:
    url = zk.url(unique_prefix()) + f"?spread={SPREAD}"
    parsed = RegistryURL.parse(url)
    mine = [foreign(n, nodes=1, services=2) for n in range(6)]
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    for inst in mine:
        reg.register(inst)
    own, restorer = reg._restorer.own, reg._restorer  # type: ignore[attr-defined]
    wait_until(lambda: own.holds, 5, "its nodes watched")
    sent = requests_of(reg, monkeypatch)
    expire_zk_session(reg.client)  # type: ignore[attr-defined]
    wait_until(lambda: sent == ["Transaction", "SetWatches"], 10, "recovered, re-armed")
    look = KazooClient(hosts=f"{parsed.hosts[0][0]}:{parsed.hosts[0][1]}")
    look.start(10)
    try:
        look.delete(parsed.key(*mine[2].key))  # the new session's node: seen, written back
        wait_until(lambda: restorer.restored == 1, SPREAD + 2.0, "written back")
    finally:
        look.stop()
        look.close()


def test_own_off_leaves_its_nodes_to_the_agents_reconcile(zk: ServerCluster,
                                                          regs: list[Registry]) -> None:
    """``own=off``: no watch of the host's own nodes, nor a listener of its connection for
    them (what another writer deletes is left to the agent's reconcile, ``--resync``)."""
    reg = open_registry(zk.url(unique_prefix()) + "?own=off", ttl=5)
    regs.append(reg)
    reg.register(foreign(0, nodes=1, services=1))
    assert reg._restorer.own is None  # type: ignore[attr-defined]
    assert reg._own.keys == set()  # type: ignore[attr-defined]
    assert reg._own._on_state not in reg.client.state_listeners  # type: ignore[attr-defined]
