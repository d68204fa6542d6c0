"""The session timeout a real ZooKeeper grants (the tests' members: tickTime 500 ms, so
sessions of 1 to 10 s) against the ``--ttl`` asked for: a value outside the member's range is
clamped by it, told once with both figures, and followed by the reconnect window (at most a
third of the session timeout); one inside is granted as asked and nothing is said."""

from __future__ import annotations

import logging

import pytest

from discovery.registry import open_registry
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("ttl", "granted"), [(5.0, 5.0), (12.0, 10.0), (0.5, 1.0)],
                         ids=["within", "over-max", "under-min"])
def test_the_granted_session_timeout_is_told_and_followed(
        zk_single: ServerCluster, caplog: pytest.LogCaptureFixture, ttl: float,
        granted: float) -> None:
    zk_single.ensure_running()
    caplog.set_level(logging.WARNING, logger="discovery.registry.zk_session")
    reg = open_registry(zk_single.url(unique_prefix()) + "?spread=6", ttl=ttl)
    try:
        reg.snapshot()  # connected: the handshake was answered
        session = reg._session  # type: ignore[attr-defined]
        wait_for(lambda: session.seconds == granted, timeout=5,
                 message=f"granted {session.seconds}s, expected {granted}s")
        told = [r.getMessage() for r in caplog.records if "grants sessions" in r.getMessage()]
        if granted == ttl:
            assert told == []
        else:
            assert len(told) == 1, told
            assert f"grants sessions of {granted:g}s, not the {ttl:g}s asked for" in told[0]
            assert "minSessionTimeout and maxSessionTimeout" in told[0]
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
