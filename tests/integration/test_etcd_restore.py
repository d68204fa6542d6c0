"""etcd restored from a backup (``etcdctl snapshot save``, then ``snapshot restore``): etcd 3.4
comes back at the backup's revision, behind the revision every watch of the fleet has seen.
A watch that resumed from its own revision would wait there, silent, until etcd caught up:
every host would miss every change meanwhile. It reads everything again instead (a
``reset``) and follows on from there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from discovery.registry import Change, open_registry
from tests.harness.history import a_late_put_arrives, first_reset
from tests.harness.history import instance as inst
from tests.harness.servers import EtcdCluster, unique_prefix, wait_until
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration

ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def etcdctl(*args: str) -> None:
    subprocess.run([ETCDCTL, *args], check=True, capture_output=True, timeout=30,
                   env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})


def test_a_watch_reads_again_a_registry_restored_from_a_backup(tmp_path: Path) -> None:
    cluster = EtcdCluster(1, tmp_path / "etcd")  # its own: a restore loses the others' data
    cluster.start()
    url = cluster.url(unique_prefix())
    writer = open_registry(url, ttl=10)
    follower = open_registry(url, ttl=10)
    changes: list[Change] = []
    watch = follower.watch(changes.append)
    try:
        writer.register(inst(1))
        host, port = cluster.address(0)
        backup = tmp_path / "backup.db"
        etcdctl("--endpoints", f"{host}:{port}", "snapshot", "save", str(backup))
        for n in range(2, 6):  # after the backup: revisions the restored etcd never had
            writer.register(inst(n))
        wait_until(lambda: any(c.key == inst(5).key for c in changes), 10, "the last put")
        argv = cluster.procs[0].argv
        data = Path(argv[argv.index("--data-dir") + 1])
        cluster.kill_member(0)
        shutil.rmtree(data)
        etcdctl("snapshot", "restore", str(backup), "--data-dir", str(data),
                "--name", argv[argv.index("--name") + 1],
                "--initial-cluster", argv[argv.index("--initial-cluster") + 1],
                "--initial-advertise-peer-urls",
                argv[argv.index("--initial-advertise-peer-urls") + 1])
        seen = len(changes)
        cluster.ensure_running()
        snapshot = wait_for(lambda: first_reset(changes, seen), 15,
                            message="a reset once etcd is back, behind the watch")
        assert snapshot is not None
        assert set(snapshot.instances) == {inst(1).key}  # what the backup held
        a_late_put_arrives(url, 10, changes, seen)
    finally:
        watch.stop()
        follower.close(revoke=False)
        writer.close(revoke=False)
        cluster.stop()
