"""etcd restored from a backup (``etcdctl snapshot save``, then ``snapshot restore``): etcd 3.4
comes back at the backup's revision, behind the revision every watch of the fleet has seen.
A watch that resumed from its own revision would wait there, silent, until etcd caught up:
every host would miss every change meanwhile. It reads everything again instead (a
``reset``) and follows on from there: straight to etcd at once (the answer that creates its
watcher), behind ``etcd grpc-proxy`` at the registry's next linearizable read (a watch-only
host's pulse, an agent's reconcile), as the proxy hides both the outage and the rewind."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery.registry import Change, Registry, open_registry
from tests.harness.fleet import EtcdGrpcProxy
from tests.harness.history import a_late_put_arrives, first_reset
from tests.harness.history import instance as inst
from tests.harness.registries import no_write_back
from tests.harness.servers import EtcdCluster, unique_prefix, wait_until
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration

ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def etcdctl(*args: str) -> None:
    subprocess.run([ETCDCTL, *args], check=True, capture_output=True, timeout=30,
                   env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})


def back_up_write_and_restore(cluster: EtcdCluster, writer: Registry, changes: list[Change],
                              backup: Path, same_token: bool = False,
                              after_backup: Callable[[], object] = lambda: None) -> None:
    """Instance 1 is in the backup, 2-5 are written after it; the member is SIGKILLed and
    restored from the backup (started again by the caller); ``same_token``: under the
    cluster's own ``--initial-cluster-token``, so under its own cluster id (else etcdctl's
    default token: another id). The writer puts back nothing the restore lost (owned.py does,
    in its own tests): what the watches read is what the backup held."""
    no_write_back(writer)
    writer.register(inst(1))
    host, port = cluster.address(0)
    etcdctl("--endpoints", f"{host}:{port}", "snapshot", "save", str(backup))
    after_backup()
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
            argv[argv.index("--initial-advertise-peer-urls") + 1],
            *(["--initial-cluster-token", argv[argv.index("--initial-cluster-token") + 1]]
              if same_token else []))


def test_a_watch_reads_again_a_registry_restored_from_a_backup(tmp_path: Path) -> None:
    cluster = EtcdCluster(1, tmp_path / "etcd")  # its own: a restore loses the others' data
    cluster.start()
    url = cluster.url(unique_prefix())
    writer = open_registry(url, ttl=10)
    follower = open_registry(url, ttl=10)
    # an agent alone: a watch of its own key (etcd_own), which resumes 3 to 20 spreads after
    # its link is lost (owned.OWN_LATER): 1.5 to 10 s here
    owner = open_registry(f"{url}?spread=0.5", ttl=10)
    changes: list[Change] = []
    watch = follower.watch(changes.append, writer.revision())  # (not from 0: see below)
    try:
        owner.register(inst(9))
        wait_until(lambda: owner._restorer.own.holds, 5, "its own key watched")  # type: ignore
        before = owner.reads.counts()
        # its key changed after the backup, 20 times: the own-key watch has seen further
        # than the restored etcd gets (the writes below) before it is back
        back_up_write_and_restore(cluster, writer, changes, tmp_path / "backup.db",
                                  after_backup=lambda: [owner.register(dataclasses.replace(
                                      inst(9), weight=50 + n)) for n in range(20)])
        seen = len(changes)
        cluster.ensure_running()
        snapshot = wait_for(lambda: first_reset(changes, seen), 15,
                            message="a reset once etcd is back, behind the watch")
        assert snapshot is not None
        assert set(snapshot.instances) == {inst(1).key, inst(9).key}  # what the backup held
        a_late_put_arrives(url, 10, changes, seen)
        # the own-key watch, behind too, read its node again once: not its service, not twice
        wait_until(lambda: (owner.reads.counts() - before).node_reads >= 1, 15,
                   "the own-key watch's read")
        time.sleep(1.0)  # an absence window: no second read (its read told no rewind of it)
        cost = owner.reads.counts() - before
        assert (cost.node_reads, cost.full_reads) == (1, 0), cost
    finally:
        watch.stop()
        follower.close(revoke=False)
        owner.close(revoke=False)
        writer.close(revoke=False)
        cluster.stop()


def test_hosts_behind_a_proxy_read_again_a_registry_restored_from_a_backup(
        tmp_path: Path) -> None:
    """A watch-only host (its pulse, once a TTL) and an agent (its reconcile's index read)."""
    ttl = 2.0
    cluster = EtcdCluster(1, tmp_path / "etcd")
    cluster.start()
    proxy = EtcdGrpcProxy(cluster, tmp_path / "grpc-proxy").start()
    prefix = unique_prefix()
    writer = open_registry(cluster.url(prefix), ttl=10)
    watcher = open_registry(proxy.url(prefix), ttl=ttl)  # registers nothing: pulses
    agent = open_registry(proxy.url(prefix), ttl=ttl)
    heard: list[Change] = []
    changes: list[Change] = []
    # from a revision read first: from 0 ("now") a watch is established after watch()
    # returns, through the proxy later still, and the put below came before it 1 run in ~100
    start = writer.revision()
    watches = [watcher.watch(heard.append, start), agent.watch(changes.append, start)]
    try:
        agent.register(inst(8))
        wait_until(lambda: any(c.key == inst(8).key for c in heard), 10, "the agent's put")
        back_up_write_and_restore(cluster, writer, heard, tmp_path / "backup.db")
        wait_until(lambda: any(c.key == inst(5).key for c in changes), 10, "the last put")
        seen, seen_by_agent = len(heard), len(changes)
        cluster.ensure_running()
        # the next pulse: a TTL (+10 %) away, after one that was in flight through the outage
        # gave up (the registry's timeout, 5 s)
        snapshot = wait_for(lambda: first_reset(heard, seen), ttl * 1.1 + 5 + 1,
                            message="the watch-only host's reset, at its pulse")
        assert snapshot is not None and set(snapshot.instances) == {inst(1).key, inst(8).key}
        assert first_reset(changes, seen_by_agent) is None  # no pulse: a lease
        agent.node_snapshot(inst(8).node)  # the reconcile
        snapshot = wait_for(lambda: first_reset(changes, seen_by_agent), 10,
                            message="the agent's reset, after its reconcile's read")
        assert snapshot is not None and inst(1).key in snapshot.instances
        a_late_put_arrives(cluster.url(prefix), 10, heard, seen)
        wait_until(lambda: any(c.key == inst(9).key for c in changes[seen_by_agent:]), 10,
                   "the late put, through the agent's watch")
    finally:
        for w in watches:
            w.stop()
        for reg in (agent, watcher, writer):
            reg.close(revoke=False)
        proxy.stop()
        cluster.stop()


@pytest.mark.parametrize("told_by", ["raft term", "raft index"])
def test_behind_a_proxy_a_restore_past_the_hosts_revision_is_told(told_by: str,
                                                                  tmp_path: Path) -> None:
    """Restored under the cluster's own token (its own cluster id), then written to at once
    past the revision a host behind the proxy had seen: the revision of the host's next
    linearizable read says nothing. From a cluster that had been restarted (raft term 3; a
    restored one starts again at 2) the term does; from one still at its first term, only the
    answering member's raft index, which the watch-only host's pulse asks (``Status``), does:
    a restored member's log starts again at one entry, and the cluster had a life of writes
    before the backup. Without them the host never reads again and misses for good the writes
    between the backup's revision and its own."""
    cluster = EtcdCluster(1, tmp_path / "etcd")
    cluster.start()
    if told_by == "raft term":
        cluster.kill_member(0)  # SIGKILL and start: an election, raft term 3
        cluster.ensure_running()
    else:  # the cluster's life before the backup: more raft entries than after the restore
        life = open_registry(cluster.url(unique_prefix()), ttl=10)
        for n in range(40):
            life.register(inst(100 + n))
        life.close(revoke=False)
    proxy = EtcdGrpcProxy(cluster, tmp_path / "grpc-proxy").start()
    prefix = unique_prefix()
    writer = open_registry(cluster.url(prefix), ttl=10)
    host = open_registry(proxy.url(prefix), ttl=60)  # watch-only: no pulse within this test
    heard: list[Change] = []
    watch = host.watch(heard.append, writer.revision())  # (not from 0: see above)
    try:
        before = host.revision()  # as its pulse would: the cluster and the term it knows
        pulse = host._pulse_read  # type: ignore[attr-defined]  # a watch-only host's, at once
        pulse()  # and the member's raft index
        back_up_write_and_restore(cluster, writer, heard, tmp_path / "backup.db",
                                  same_token=True)
        seen = len(heard)
        cluster.ensure_running()
        for n in range(10, 20):  # past the revision the host had seen: it cannot tell by that
            writer.register(inst(n))
        assert host.revision() > before + 5  # the host's next linearizable read
        pulse()  # the pulse's Status after it
        truth = set(writer.snapshot().instances)
        assert inst(10).key in truth and inst(2).key not in truth
        snapshot = wait_for(lambda: first_reset(heard, seen), 10,
                            message=f"the host's reset, told by the lower {told_by}")
        assert snapshot is not None and set(snapshot.instances) == truth
    finally:
        watch.stop()
        host.close(revoke=False)
        writer.close(revoke=False)
        proxy.stop()
        cluster.stop()

