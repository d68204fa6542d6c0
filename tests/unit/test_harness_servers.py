"""The harness's server settings the fleet bench uses, read from what it would start (nothing
is started): ZooKeeper's ``zoo.cfg`` lines and each etcd member's ``GOMAXPROCS``."""

from __future__ import annotations

from pathlib import Path

from tests.harness.servers import ZK_DIRECT_IO, EtcdCluster, ZkEnsemble


def test_zookeeper_settings_go_into_every_members_zoo_cfg(tmp_path: Path) -> None:
    ZkEnsemble(3, tmp_path / "direct", settings=ZK_DIRECT_IO)
    ZkEnsemble(3, tmp_path / "plain")
    for i in (1, 2, 3):
        direct = (tmp_path / "direct" / f"zk{i}" / "zoo.cfg").read_text().splitlines()
        plain = (tmp_path / "plain" / f"zk{i}" / "zoo.cfg").read_text().splitlines()
        assert set(ZK_DIRECT_IO) <= set(direct)
        assert not set(ZK_DIRECT_IO) & set(plain)
        assert [line for line in direct if line not in ZK_DIRECT_IO][:3] == plain[:3]


def test_etcd_members_get_gomaxprocs_only_when_asked(tmp_path: Path) -> None:
    one = EtcdCluster(3, tmp_path / "one", go_procs=1)
    default = EtcdCluster(3, tmp_path / "default")
    assert all(p.env is not None and p.env["GOMAXPROCS"] == "1" for p in one.procs)
    assert all(p.env is not None and "PATH" in p.env for p in one.procs)  # added to, not replaced
    assert all(p.env is None for p in default.procs)  # the bench's own environment
