"""The registry contract, continued: what a lease or session outlives, and what it does not."""

from __future__ import annotations

import time

import pytest

from discovery.errors import RegistryError, RegistryUnavailable
from discovery.registry import RegistryURL
from tests.harness.fleet import close_raw, index_paths, raw_client
from tests.harness.raw_clients import expire_zk_session
from tests.harness.registries import no_write_back
from tests.harness.servers import ServerCluster, free_port, unique_prefix, wait_until
from tests.integration.test_registry_contract import (
    TTL,
    Follower,
    OpenReg,
    inst,
    instances,
    open_reg,
    proxied,
)

__all__ = ["open_reg"]
pytestmark = pytest.mark.integration

# "Gone within the TTL", measured from the crash. etcd revokes expired leases every 0.5 s;
# ZooKeeper rounds a session's expiry up to the next tick (tickTime 0.5 s in the harness).
# Measured from the cut with TTL 2: etcd 1.9-2.3 s, ZooKeeper 1.6-2.3 s.
EXPIRED_WITHIN = TTL + 1.0


def scheme(url: str) -> str:
    return RegistryURL.parse(url).scheme


# -- lifetime ------------------------------------------------------------------------------


def test_close_revoke_removes_everything(registry_url: str, open_reg: OpenReg) -> None:
    reg, other = open_reg(registry_url, ttl=30), open_reg(registry_url)
    for n in range(5):
        reg.register(inst(n, service=f"s{n % 2}"))
    other.register(inst(9))  # not ours: stays
    assert len(other.snapshot().instances) == 6
    reg.close(revoke=True)
    assert list(other.snapshot().instances) == [inst(9).key]  # at once, not after the TTL
    with pytest.raises(RegistryError):
        reg.register(inst(1))
    reg.close()  # twice: fine


def test_a_revoke_leaves_what_a_successor_took_over(registry_url: str,
                                                    open_reg: OpenReg) -> None:
    """An old agent stopped (SIGTERM) after its successor adopted one of its instances: the
    revoke removes only what is still the old one's (on ZooKeeper it deleted each path it
    had written, the successor's node since the take-over among them)."""
    old, new = open_reg(registry_url, ttl=30), open_reg(registry_url, ttl=30)
    other = open_reg(registry_url)
    old.register(inst(1))
    old.register(inst(2))
    new.register(inst(1))  # adopted: the same key, now of the successor's lease / session
    old.close(revoke=True)
    assert list(other.snapshot().instances) == [inst(1).key]


def test_instance_and_its_index_entry_change_together(registry_url: str,
                                                      open_reg: OpenReg) -> None:
    """One transaction writes a new instance and its index entry, one takes both over from a
    predecessor, one deletes both: an agent killed mid-registration leaves both or neither, so
    its successor finds all it wrote (on ZooKeeper the index node came a round trip after the
    instance)."""
    url, one = RegistryURL.parse(registry_url), inst(1)
    old, reg = open_reg(registry_url), open_reg(registry_url)
    paths = (url.key(*one.key), f"{url.prefix}/nodes/{one.node}/web/{one.id}")
    client = raw_client(registry_url)
    etcd = url.scheme == "etcd"
    try:
        for writer in (old, reg):  # created, then taken over
            writer.register(one)
            written = {client.get(p)[1].mod_revision if etcd else client.exists(p).czxid
                       for p in paths}
            assert len(written) == 1, written
        # the predecessor, still open, would write back what its successor deletes below
        # (a hand-over's overlap, docs/operations.md "An entry deleted by hand"): gone here
        no_write_back(old)
        if etcd:
            before = client.get_response(paths[0]).header.revision
            reg.deregister(*one.key)
            # one revision for both deletes; both keys were there just before
            assert client.get_response(paths[0]).header.revision == before + 1
        else:
            reg.deregister(*one.key)
            removed = {client.exists(p.rpartition("/")[0]).pzxid for p in paths}
            assert len(removed) == 1 and min(removed) > max(written), (removed, written)
        assert not index_paths(registry_url, one.node) and not reg.snapshot().instances
    finally:
        close_raw(client)


def test_closed_without_revoke_entries_expire(registry_url: str, open_reg: OpenReg) -> None:
    """Left for a successor (SIGUSR2, a component of ``up`` that died): the entries live until
    the TTL on both backends (ZooKeeper's session was closed: its nodes went at once), then
    go."""
    reg, other = open_reg(registry_url), open_reg(registry_url)
    reg.register(inst(1))
    start = time.monotonic()
    reg.close(revoke=False)
    assert inst(1).key in other.snapshot().instances  # the lease / session lives on
    wait_until(lambda: not other.snapshot().instances, EXPIRED_WITHIN, "the entry to expire")
    assert time.monotonic() - start >= TTL * 0.5  # not at once


def test_crashed_agent_entries_expire_within_ttl(registry_url: str, open_reg: OpenReg) -> None:
    """The agent's process is gone (no close at all): modelled by cutting its network for good."""
    proxy, via_proxy = proxied(registry_url)
    try:
        reg, other = open_reg(via_proxy), open_reg(registry_url)
        reg.register(inst(1))
        reg.register(inst(2))
        time.sleep(TTL * 0.75)  # a deliberate window, no sync: keepalive / pings must work
        assert len(other.snapshot().instances) == 2
        with proxy.blocked():
            start = time.monotonic()
            wait_until(lambda: not other.snapshot().instances, EXPIRED_WITHIN,
                       "the crashed agent's entries to expire")
            took = time.monotonic() - start
            assert TTL * 0.5 <= took <= EXPIRED_WITHIN, took  # not early, not late
    finally:
        proxy.close()


def test_outage_longer_than_ttl_re_registers(registry_url: str, open_reg: OpenReg) -> None:
    """The lease/session expires during an outage; after it, every owned entry comes back."""
    proxy, via_proxy = proxied(registry_url)
    try:
        reg, other = open_reg(via_proxy), open_reg(registry_url)
        mine = {i.key: i for i in (inst(1), inst(2, service="api"))}
        for i in mine.values():
            reg.register(i)
        reg.register(inst(3))
        reg.deregister("web", inst(3).id)  # not owned any more: must not come back
        seen = Follower().follow(other)
        with proxy.blocked():
            wait_until(lambda: not other.snapshot().instances, EXPIRED_WITHIN,
                       "the entries to expire during the outage")
        wait_until(lambda: instances(other.snapshot()) == mine, 15,
                   "the entries to be re-registered")
        seen.wait_state(mine)
        reg.register(inst(4))  # and the registry works normally again
        assert len(other.snapshot().instances) == 3
    finally:
        proxy.close()


def test_register_replaces_entry_of_a_previous_run(registry_url: str, open_reg: OpenReg) -> None:
    """A restarted agent re-registers while its earlier run's entry has not expired yet."""
    proxy, via_proxy = proxied(registry_url)
    try:
        old = open_reg(via_proxy)
        old.register(inst(1, weight=1))
        proxy.cut()
        with proxy.blocked():  # the old process hangs: its lease / session is still alive
            proxy.close()  # for good
            new, other = open_reg(registry_url), open_reg(registry_url)
            new.register(inst(1, weight=2))
            assert [i.weight for i in other.snapshot().instances.values()] == [2]
            # A deliberate absence window, no sync: the old run's lease / session expires in
            # it (EXPIRED_WITHIN of the cut) and must not take the new entry with it.
            time.sleep(EXPIRED_WITHIN)
            assert [i.weight for i in other.snapshot().instances.values()] == [2]
    finally:
        proxy.close()


def test_state_listener_and_unreachable_registry(open_reg: OpenReg) -> None:
    for s in ("etcd", "zk"):
        reg = open_reg(f"{s}://127.0.0.1:{free_port()}/p", timeout=1.0)
        states: list[bool] = []
        reg.add_state_listener(states.append)
        for op in (lambda reg=reg: reg.register(inst(1)), reg.snapshot):
            start = time.monotonic()
            with pytest.raises(RegistryUnavailable) as err:
                op()
            assert time.monotonic() - start < 1.0 + 0.5
            assert "127.0.0.1:" in str(err.value)
        start = time.monotonic()
        reg.close()
        assert time.monotonic() - start < 3.0
        assert True not in states


# -- ZooKeeper sessions --------------------------------------------------------------------


def test_zk_session_expiry_recreates_nodes(zk_single: ServerCluster, open_reg: OpenReg) -> None:
    from discovery.registry.zk import ZkRegistry

    url = zk_single.url(unique_prefix())
    reg, other = open_reg(url, ttl=4.0), open_reg(url)
    assert isinstance(reg, ZkRegistry) and isinstance(other, ZkRegistry)
    mine = {i.key: i for i in (inst(1), inst(2), inst(3, service="api"))}
    for i in mine.values():
        reg.register(i)
    path = reg.url.key("web", inst(1).id)
    old_owner = reg.client.get(path)[1].ephemeralOwner
    own = Follower().follow(reg)
    states: list[bool] = []
    reg.add_state_listener(states.append)

    expire_zk_session(reg.client)

    new_owner = reg.client.client_id[0]
    assert new_owner != old_owner

    def recreated() -> bool:
        _, stat = other.client.get(path)
        return bool(stat.ephemeralOwner == new_owner) and instances(other.snapshot()) == mine

    wait_until(recreated, 10, "the nodes to be re-created under the new session")
    wait_until(lambda: "reset" in own.kinds(), 10, "a reset for the registry's own watch")
    own.wait_state(mine)
    assert False in states and states[-1] is True
