"""zk_rewind: ZooKeeper's ``srvr`` answer, and when an ensemble is behind for good."""

from __future__ import annotations

import pytest

from discovery.registry import zk_rewind
from discovery.registry.zk_rewind import ensemble_behind, parse_srvr

SRVR = """Zookeeper version: 3.8.0, built on 2023-10-30 15:03 UTC
Latency min/avg/max: 0/0.5/12
Received: 120
Sent: 119
Connections: 2
Outstanding: 0
Zxid: 0x20000001a
Mode: {mode}
Node count: 12
"""


def test_parse_srvr_reads_mode_and_zxid() -> None:
    assert parse_srvr(SRVR.format(mode="leader")) == ("leader", 0x20000001A)
    assert parse_srvr(SRVR.format(mode="standalone")) == ("standalone", 0x20000001A)


@pytest.mark.parametrize("text", [
    "This ZooKeeper instance is not currently serving requests\n",
    SRVR.format(mode="looking"),
    "srvr is not executed because it is not in the whitelist.\n",
    "",
])
def test_parse_srvr_none_unless_serving(text: str) -> None:
    assert parse_srvr(text) is None


@pytest.mark.parametrize(("states", "behind"), [
    ([("leader", 5), ("follower", 5)], True),
    ([("standalone", 5)], True),
    ([("leader", 10), ("follower", 5)], False),  # the leader has it: a follower lags
    ([("follower", 5), ("follower", 5)], False),  # no leader answered: not sure
    ([("leader", 5), ("follower", 11)], False),
    ([], False),  # nobody answers: down, not behind
])
def test_ensemble_behind_needs_a_leader_and_every_answer_behind(
        monkeypatch: pytest.MonkeyPatch, states: list[tuple[str, int]], behind: bool) -> None:
    answers = dict(enumerate(states))
    monkeypatch.setattr(zk_rewind, "member_state",
                        lambda host, port, timeout, tls: answers.get(port))
    hosts = [("127.0.0.1", port) for port in range(len(states) + 1)]  # one never answers
    assert ensemble_behind(hosts, zxid=10) is behind
