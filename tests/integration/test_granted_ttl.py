"""The TTL a real registry grants against the ``--ttl`` asked for. ZooKeeper (the tests'
members: tickTime 500 ms, so sessions of 1 to 10 s): a value outside the member's range is
clamped by it, told once with both figures, and followed by the reconnect window (at most a
third of the session timeout). etcd (default election timeout, 1 s): a lease shorter than
1.5 election timeouts is granted 2 s, and told. A value within is granted as asked and
nothing is said."""

from __future__ import annotations

import logging

import pytest

from discovery.model import Instance
from discovery.registry import open_registry
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration


def assert_told(caplog: pytest.LogCaptureFixture, noun: str, granted: float, ttl: float,
                advice: str) -> None:
    """Nothing said when granted as asked; else one warning with both figures and advice."""
    told = [r.getMessage() for r in caplog.records if f"grants {noun}" in r.getMessage()]
    if granted == ttl:
        assert told == []
        return
    assert len(told) == 1, told
    assert f"grants {noun} of {granted:g}s, not the {ttl:g}s asked for (--ttl)" in told[0]
    assert advice in told[0]


@pytest.mark.parametrize(("ttl", "granted"), [(5.0, 5.0), (12.0, 10.0), (0.5, 1.0)],
                         ids=["within", "over-max", "under-min"])
def test_the_granted_session_timeout_is_told_and_followed(
        zk_single: ServerCluster, caplog: pytest.LogCaptureFixture, ttl: float,
        granted: float) -> None:
    zk_single.ensure_running()
    caplog.set_level(logging.WARNING, logger="discovery.registry.ttl")
    reg = open_registry(zk_single.url(unique_prefix()) + "?spread=6", ttl=ttl)
    try:
        reg.snapshot()  # connected: the handshake was answered
        session = reg._session  # type: ignore[attr-defined]
        wait_for(lambda: session.seconds == granted, timeout=5,
                 message=f"granted {session.seconds}s, expected {granted}s")
        assert_told(caplog, "sessions", granted, ttl, "minSessionTimeout and maxSessionTimeout")
        # the policy kazoo's connection loop copies at each start (its connection's
        # retry_sleeper), and such a copy: the window is spread=6 s capped at a third of the
        # granted timeout, not of the one asked for; and it stops waiting once kazoo stops
        window = min(6.0, granted / 3)
        retry = reg.client._connection.retry_sleeper  # type: ignore[attr-defined]
        assert retry.max_delay == pytest.approx(window / 2)
        assert retry.copy().max_delay == pytest.approx(window / 2)
        assert retry.interrupt is not None and retry.interrupt() is False
    finally:
        reg.close()


@pytest.mark.parametrize(("ttl", "granted"), [(5.0, 5), (1.0, 2)], ids=["within", "under-min"])
def test_etcd_tells_a_lease_ttl_unlike_the_one_asked_for(
        etcd_single: ServerCluster, caplog: pytest.LogCaptureFixture, ttl: float,
        granted: int) -> None:
    etcd_single.ensure_running()
    caplog.set_level(logging.WARNING, logger="discovery.registry.ttl")
    reg = open_registry(etcd_single.url(unique_prefix()), ttl=ttl)
    try:
        reg.register(Instance(service="web", id="h1:000000000001:80", node="h1",
                              address="127.0.0.1", port=8001))  # grants the lease
        assert_told(caplog, "leases", granted, ttl, "election timeouts")
    finally:
        reg.close()
