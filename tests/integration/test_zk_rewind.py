"""A ZooKeeper ensemble that lost its data (its data directory wiped, the member started again
empty, as after a restore of an empty backup): its zxid starts over, behind the one every host
has seen, and it refuses their sessions ("client must try another server"); kazoo alone would
try again forever (measured: still disconnected 30 s later). The registry sees the ensemble
behind (``srvr``), starts over with a new session, registers its instances again and its
watch reads everything again (zk_rewind). Over TLS too: ``srvr`` goes over the TLS client
port, with the registry's certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery.registry import Change, open_registry
from tests.harness.history import a_late_put_arrives, first_reset
from tests.harness.history import instance as inst
from tests.harness.secure import TlsZk, make_pki
from tests.harness.servers import ZkEnsemble, unique_prefix, wait_until
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration

TTL = 4.0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_host_starts_over_on_an_ensemble_that_lost_its_data(tmp_path: Path, tls: bool
                                                               ) -> None:
    # its own ensemble: the wipe loses everyone's data
    ensemble = (TlsZk(tmp_path / "zk", make_pki(tmp_path / "pki")) if tls
                else ZkEnsemble(1, tmp_path / "zk"))
    ensemble.start()
    url = ensemble.url(unique_prefix())
    reg = open_registry(url, ttl=TTL)
    states: list[bool] = []
    reg.add_state_listener(states.append)
    changes: list[Change] = []
    reg.snapshot()  # connected: what comes after the watch starts is a change (zk_watch)
    watch = reg.watch(changes.append)
    try:
        for n in range(1, 4):
            reg.register(inst(n))
        wait_until(lambda: any(c.key == inst(3).key for c in changes), 10, "the last put")
        data = tmp_path / "zk" / "zk1" / "data"
        ensemble.kill_member(0)
        wiped = [p for p in data.iterdir() if p.name != "myid"]
        assert wiped, f"nothing in {data} to wipe"
        for path in wiped:
            for f in sorted(path.rglob("*"), reverse=True):
                f.rmdir() if f.is_dir() else f.unlink()
            path.rmdir()
        seen = len(changes)
        wait_until(lambda: states and states[-1] is False, 10, "the connection lost")
        ensemble.ensure_running()
        # checked once a TTL after a TTL down, then kazoo's next try (within TTL/3)
        wait_until(lambda: states[-1] is True, 2 * TTL + TTL / 3 + 3, "connected again")
        assert wait_for(lambda: first_reset(changes, seen), 10,
                        message="the watch reads everything again") is not None
        wait_until(lambda: set(reg.snapshot().instances) == {inst(n).key for n in range(1, 4)},
                   10, "the instances registered again")
        a_late_put_arrives(url, TTL, changes, seen)
    finally:
        watch.stop()
        reg.close(revoke=False)
        ensemble.stop()
