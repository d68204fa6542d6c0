"""A fleet's worth of registry entries, written by raw clients, and etcd's gRPC proxy.

``fill_foreign(url, n)`` writes ``n`` instances of *other* nodes the way their agents would
(instance + per-node index entry), in bulk, bypassing the registry code. ``index_paths(url,
node)`` lists one node's index entries as the raw client sees them. :class:`EtcdGrpcProxy`
runs ``etcd grpc-proxy start`` (the Debian etcd-server binary) on a loopback port in front of
a cluster; it is stopped, SIGKILLed and restarted (on the same port) by its own pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from discovery.model import Instance, State
from discovery.registry.url import RegistryURL
from tests.harness.servers import ETCD_BIN, HOST, ServerCluster, _Proc, wait_until
from tests.harness.util import server_ports

BATCH = 100  # writes per transaction (etcd's default --max-txn-ops is 128)


def foreign(n: int, nodes: int = 100, services: int = 20) -> Instance:
    """The ``n``-th instance of the fleet: node ``f<n % nodes>``, service ``svc<n % services>``."""
    node = f"f{n % nodes}"
    return Instance(service=f"svc{n % services}", id=f"{node}:{n:012x}:8080", node=node,
                    address="192.0.2.1", port=20000 + n % 40000, tags=("blue", "v2"),
                    meta={"team": "payments", "zone": "eu-west-1a"}, container_id=f"{n:064x}",
                    container_name=f"app-{n}", image="registry.local/app:1.2.3",
                    registered_at=1.0)


def _index(url: RegistryURL, inst: Instance) -> str:
    return f"{url.prefix}/nodes/{inst.node}/{inst.service}/{inst.id}"


def fill_foreign(url_s: str, count: int, **kw: int) -> list[Instance]:
    """Write ``count`` instances of other nodes (each with its index entry), persistent."""
    url = RegistryURL.parse(url_s)
    made = [foreign(n, **kw) for n in range(count)]
    host, port = url.hosts[0]
    if url.scheme == "etcd":
        import pyetcd
        from pyetcd import transactions

        client = pyetcd.client(host, port, timeout=30)
        try:
            for start in range(0, count, BATCH // 2):
                ops = []
                for inst in made[start:start + BATCH // 2]:
                    ops += [transactions.Put(url.key(inst.service, inst.id), inst.to_json()),
                            transactions.Put(_index(url, inst), b"")]
                client.transaction(compare=[], success=ops, failure=[])
        finally:
            client.close()
        return made
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=f"{host}:{port}", timeout=10)
    zk.start(timeout=15)
    try:
        for inst in made:  # the directories first: a transaction does not make paths
            zk.ensure_path(url.service_dir(inst.service))
            zk.ensure_path(_index(url, inst).rsplit("/", 1)[0])
        for start in range(0, count, BATCH // 2):
            txn = zk.transaction()
            for inst in made[start:start + BATCH // 2]:
                txn.create(url.key(inst.service, inst.id), inst.to_json())
                txn.create(_index(url, inst), b"")
            results = txn.commit()
            assert not any(isinstance(r, Exception) for r in results), results
    finally:
        zk.stop()
        zk.close()
    return made


def raw_client(url_s: str) -> Any:
    """A raw pyetcd or (started) kazoo client on the URL's first host; close it yourself."""
    url = RegistryURL.parse(url_s)
    host, port = url.hosts[0]
    if url.scheme == "etcd":
        import pyetcd

        return pyetcd.client(host, port, timeout=10)
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=f"{host}:{port}", timeout=10)
    zk.start(timeout=15)
    return zk


def close_raw(client: Any) -> None:
    if hasattr(client, "stop"):
        client.stop()
    client.close()


def index_paths(url_s: str, node: str) -> set[str]:
    """One node's index entries (keys / paths) as a raw client sees them."""
    url = RegistryURL.parse(url_s)
    root = f"{url.prefix}/nodes/{node}/"
    client = raw_client(url_s)
    try:
        if url.scheme == "etcd":
            return {meta.key.decode() for _, meta in client.get_prefix(root, keys_only=True)}
        from kazoo.exceptions import NoNodeError

        found: set[str] = set()
        try:
            services = client.get_children(root.rstrip("/"))
        except NoNodeError:
            return found
        for s in services:
            found |= {f"{root}{s}/{i}" for i in client.get_children(f"{root}{s}")}
        return found
    finally:
        close_raw(client)


def last_write(url_s: str, path: str) -> int:
    """The revision (etcd) or zxid (ZooKeeper) of ``path``'s last write."""
    return _meta(url_s, path)[0]


def owner(url_s: str, path: str) -> int:
    """The lease (etcd) or session (ZooKeeper: ephemeral owner) ``path`` lives by; 0: none."""
    return _meta(url_s, path)[1]


def _meta(url_s: str, path: str) -> tuple[int, int]:
    client = raw_client(url_s)
    try:
        if RegistryURL.parse(url_s).scheme == "etcd":
            meta = client.get(path)[1]
            return int(meta.mod_revision), int(meta.lease_id)
        stat = client.exists(path)
        return int(stat.mzxid), int(stat.ephemeralOwner)
    finally:
        close_raw(client)


def raw_delete(url_s: str, path: str) -> None:
    client = raw_client(url_s)
    try:
        client.delete(path)
    finally:
        close_raw(client)


@contextlib.contextmanager
def read_only(url_s: str, path: str) -> Iterator[None]:
    """ZooKeeper: ``path`` readable but nothing created or deleted under it by anyone (its
    ACL world:anyone READ and ADMIN: to open it again after), as an operator's ``setAcl``."""
    from kazoo.security import OPEN_ACL_UNSAFE, make_acl

    client = raw_client(url_s)
    try:
        client.set_acls(path, [make_acl("world", "anyone", read=True, admin=True)])
        yield
    finally:
        client.set_acls(path, OPEN_ACL_UNSAFE)
        close_raw(client)


def delete_services(url_s: str) -> int:
    """Every instance of every writer deleted at once, as an operator's ``etcdctl del --prefix
    <prefix>/services/`` does (one ``DeleteRange``); on ZooKeeper each instance node, the
    deletes sent together (a recursive delete of the directories fails while agents write
    back into them). Returns how many were deleted."""
    url = RegistryURL.parse(url_s)
    client = raw_client(url_s)
    try:
        if url.scheme == "etcd":
            return int(client.delete_prefix(url.services_root + "/").deleted)
        return _answered([client.delete_async(p) for p in _zk_instances(client, url)])
    finally:
        close_raw(client)


def _zk_instances(client: Any, url: RegistryURL) -> list[str]:
    """The paths of every instance node under ZooKeeper's ``<prefix>/services``."""
    from kazoo.exceptions import NoNodeError

    paths: list[str] = []
    with contextlib.suppress(NoNodeError):
        for s in client.get_children(url.services_root):
            with contextlib.suppress(NoNodeError):
                paths += [f"{url.service_dir(s)}/{c}" for c in client.get_children(
                    url.service_dir(s))]
    return paths


def _answered(results: list[Any]) -> int:
    """How many of kazoo's async ``results`` succeeded (the node gone or changed meanwhile:
    not counted)."""
    from kazoo.exceptions import BadVersionError, NoNodeError

    done = 0
    for result in results:
        with contextlib.suppress(NoNodeError, BadVersionError):
            result.get()
            done += 1
    return done


def as_draining(inst: Instance) -> Instance:
    return dataclasses.replace(inst, state=State.DRAINING)


def drain_services(url_s: str, batch: int = 100,
                   rewrite: Callable[[Instance], Instance] = as_draining) -> int:
    """Every instance of every writer rewritten (``rewrite``: as ``draining``; weight 0 is a
    drain too), as an operator's script that reads each value and writes it back changed does
    (etcd: ``batch`` puts a transaction, with no lease, as ``etcdctl put``; ZooKeeper: each
    node's data set, the sets sent together). Every host's watcher drains them at once.
    Returns how many were rewritten."""
    url = RegistryURL.parse(url_s)
    client = raw_client(url_s)

    def drained(raw: bytes) -> bytes:
        return rewrite(Instance.from_json(raw, where="bench")).to_json()

    try:
        if url.scheme == "etcd":
            from pyetcd import transactions

            puts = [transactions.Put(meta.key, drained(value))
                    for value, meta in client.get_prefix(url.services_root + "/")]
            for start in range(0, len(puts), batch):
                client.transaction(compare=[], success=puts[start:start + batch], failure=[])
            return len(puts)
        from kazoo.exceptions import NoNodeError

        values = {}
        for p, result in [(p, client.get_async(p)) for p in _zk_instances(client, url)]:
            with contextlib.suppress(NoNodeError):
                values[p] = result.get()
        return _answered([client.set_async(p, drained(data), version=stat.version)
                          for p, (data, stat) in values.items()])
    finally:
        close_raw(client)


class EtcdGrpcProxy:
    """``etcd grpc-proxy start`` on 127.0.0.1:``port`` in front of ``cluster``."""

    def __init__(self, cluster: ServerCluster, base_dir: Path, port: int | None = None) -> None:
        self.cluster = cluster
        # outside the ephemeral range (the cluster runs: its ports are taken): a restarted
        # proxy must find its port free, not taken by an outgoing connection
        self.port = port or server_ports(1, HOST)[0]
        base_dir.mkdir(parents=True, exist_ok=True)
        endpoints = ",".join(f"{HOST}:{p}" for p in cluster.client_ports)
        argv = [ETCD_BIN, "grpc-proxy", "start", "--endpoints", endpoints,
                "--listen-addr", f"{HOST}:{self.port}",
                "--advertise-client-url", f"{HOST}:{self.port}",
                "--data-dir", str(base_dir / "proxy-data")]
        self.proc = _Proc(argv, base_dir / "grpc-proxy.log", base_dir)

    def url(self, prefix: str) -> str:
        return f"etcd://{HOST}:{self.port}{prefix}"

    @property
    def pid(self) -> int | None:
        return self.proc.popen.pid if self.proc.running and self.proc.popen else None

    def start(self, timeout: float = 30.0) -> EtcdGrpcProxy:
        self.proc.start()
        wait_until(self._serving, timeout, f"etcd grpc-proxy on port {self.port}")
        return self

    def _serving(self) -> bool:
        import pyetcd

        if not self.proc.running:
            raise RuntimeError(f"grpc-proxy exited:\n{self.proc.log_tail()}")
        client = pyetcd.client(HOST, self.port, timeout=1)
        try:
            client.get("/health")
            return True
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the proxy by its pid (no goodbye to anyone) and reap it."""
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()
