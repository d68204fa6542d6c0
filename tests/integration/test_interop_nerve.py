"""Airbnb Nerve's ZooKeeper format, both ways, on a real ZooKeeper.

Write side: the ZooKeeper backend with ``?format=nerve&path=…/{service}/services`` (Airbnb's
layout) writes ephemeral sequential nodes holding Nerve's JSON; a real Prometheus with
``nerve_sd_configs`` lists them, and the nodes survive a session expiry and go on deregister.
Read side: nodes written with raw kazoo exactly as Nerve's reporter writes them (and
malformed ones) are read by ``discovery services`` and by the client's live watch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss
from kazoo.security import make_digest_acl

from discovery import Client
from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.zk import ZkRegistry
from tests.harness.prometheus import Prometheus
from tests.harness.raw_clients import expire_zk_session
from tests.harness.registries import no_write_back
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration
NERVE_KEYS = {"host", "port", "name", "weight", "labels"}


@pytest.fixture
def zk(zk_single: ServerCluster) -> Iterator[KazooClient]:
    zk_single.ensure_running()
    host, port = zk_single.address(0)
    client = KazooClient(hosts=f"{host}:{port}", timeout=5)
    client.start(timeout=20)
    yield client
    client.stop()
    client.close()


def layout(zk_single: ServerCluster) -> tuple[str, str, str]:
    """(registry URL, Airbnb-style path template, the web service's folder)."""
    host, port = zk_single.address(0)
    base = unique_prefix()
    template = f"{base}/nerve/services/{{service}}/services"
    url = f"zk://{host}:{port}{base}?format=nerve&path={template}"
    return url, template, template.replace("{service}", "web")


def inst(n: int, **kw: object) -> Instance:
    return Instance(service="web", id=f"host{n}:{n:012x}:8080", node=f"host{n}",
                    address=f"127.0.1.{n}", port=31000 + n, **kw)  # type: ignore[arg-type]


def test_written_as_nerve_and_listed_by_prometheus_nerve_sd(
        zk_single: ServerCluster, zk: KazooClient, tmp_path: Path) -> None:
    url, _, folder = layout(zk_single)
    registry = open_registry(url, ttl=4.0)
    assert isinstance(registry, ZkRegistry)
    one, two = inst(1, tags=("blue",), meta={"az": "a"}), inst(2)
    registry.register(one)
    registry.register(two)
    host, port = zk_single.address(0)
    prom = Prometheus(f"""
global: {{scrape_interval: 1h}}
scrape_configs:
  - job_name: nerve
    nerve_sd_configs: [{{servers: ["{host}:{port}"], paths: ["{folder}"], timeout: 5s}}]
""", tmp_path).start()
    try:
        children = zk.get_children(folder)
        assert sorted(c.rsplit("_", 1)[0] for c in children) == [one.id, two.id]
        assert all(len(c.rsplit("_", 1)[1]) == 10 for c in children)  # ZooKeeper's sequence
        data, stat = zk.get(f"{folder}/{min(children)}")
        record = json.loads(data)
        assert set(record) == NERVE_KEYS and stat.ephemeralOwner != 0
        assert (record["host"], record["port"], record["name"]) == ("127.0.1.1", 31001, one.id)
        assert record["labels"] == {"az": "a", "node": "host1", "tags": "blue"}

        expect = {"127.0.1.1:31001", "127.0.1.2:31002"}
        wait_for(lambda: prom.addresses("nerve") == expect, 40, interval=0.25,
                 message=f"Prometheus nerve_sd lists {expect}")
        target = {t["__address__"]: t for t in prom.targets("nerve")}["127.0.1.1:31001"]
        assert target["__meta_nerve_endpoint_name"] == one.id
        assert target["__meta_nerve_path"].startswith(f"{folder}/{one.id}_")

        registry.register(inst(1, tags=("blue", "v2"), meta={"az": "a"}))  # same session: set
        assert len(zk.get_children(folder)) == 2
        before = set(zk.get_children(folder))
        expire_zk_session(registry.client)  # type: ignore[attr-defined]
        after = wait_for(lambda: len(now := set(zk.get_children(folder))) == 2 and now, 20,
                         message="both instances re-created in the new session")
        assert not after & before  # new sequential nodes, the old ones died with the session
        registry.deregister("web", two.id)
        wait_for(lambda: prom.addresses("nerve") == {"127.0.1.1:31001"}, 40, interval=0.25,
                 message="Prometheus drops the deregistered instance")
        assert [c.rsplit("_", 1)[0] for c in zk.get_children(folder)] == [one.id]
    except AssertionError:
        print(f"----- prometheus log -----\n{prom.log()}")
        raise
    finally:
        prom.stop()
        registry.close()
    assert zk.get_children(folder) == []  # close removed our nodes


def test_airbnbs_own_prefix_reads_a_nodes_instances_through_its_index(
        zk_single: ServerCluster, zk: KazooClient) -> None:
    """The URL of migration.md, prefix /nerve and path=/nerve/services/{service}/services.

    An agent's node read goes through the per-node index (``/nerve/nerve-nodes/<node>/<svc>/``
    holding the names of the sequential nodes): the same bytes with 300 nodes of other Nerve
    hosts written next to ours, and no whole read (it read the whole registry at every
    resync). A successor (another session) finds the entries, adopts them (one node per
    instance left, of its session, and one index entry), and a deregister removes both."""
    host, port = zk_single.address(0)
    base = f"{unique_prefix()}/nerve"
    url = f"zk://{host}:{port}{base}?format=nerve&path={base}/services/{{service}}/services"
    folder = f"{base}/services/web/services"
    first, second = open_registry(url, ttl=4.0), open_registry(url, ttl=4.0)
    try:
        own = [inst(1), Instance(service="api", id="host1:00000000000a:80", node="host1",
                                 address="127.0.1.1", port=31100)]
        for one in [*own, inst(2)]:
            first.register(one)
        first.node_snapshot("host1")  # a node's first read lists everything too (see below)
        before = first.reads.counts()
        alone = first.node_snapshot("host1").instances
        cost_alone = first.reads.counts() - before
        assert {k: i.id for k, i in alone.items()} == {i.key: i.id for i in own}

        for n in range(300):
            nerve_write(zk, folder, f"i-{n:06x}",
                        b'{"host":"127.0.2.1","port":%d,"name":"i-%06x"}' % (20000 + n, n))
        before = first.reads.counts()
        crowded = first.node_snapshot("host1").instances
        cost = first.reads.counts() - before
        assert {k: i.id for k, i in crowded.items()} == {i.key: i.id for i in own}
        assert (cost.node_reads, cost.full_reads) == (1, 0)
        assert (cost.bytes, cost.keys) == (cost_alone.bytes, cost_alone.keys)
        before = first.reads.counts()
        first.snapshot()
        whole = first.reads.counts() - before
        assert cost.bytes * 10 < whole.bytes, (cost, whole)
        print(f"Nerve layout: node read {cost.bytes} B ({cost.keys} keys) for {len(own)} own "
              f"instances; whole registry {whole.bytes} B ({whole.keys} keys)")
        assert sorted(zk.get_children(f"{base}/nerve-nodes/host1")) == ["api", "web"]
        assert set(second.snapshot().instances) >= {i.key for i in own}  # no "nodes" service
        assert {s for s, _ in second.snapshot().instances} == {"web", "api"}

        session = second.client.client_id[0]  # type: ignore[attr-defined]
        before = second.reads.counts()
        assert set(second.node_snapshot("host1").instances) == {i.key for i in own}
        start = second.reads.counts() - before  # a first read: the fleet's names, its records
        assert start.full_reads == 1 and start.bytes * 3 < whole.bytes, (start, whole)
        print(f"Nerve layout: an agent's first read {start.bytes} B ({start.keys} keys)")
        for one in own:  # adopted while the first still runs: its nodes are replaced
            second.register(one)
        mine = [c for c in zk.get_children(folder) if c.startswith(f"{own[0].id}_")]
        assert len(mine) == 1 and zk.exists(f"{folder}/{mine[0]}").ephemeralOwner == session
        assert zk.get_children(f"{base}/nerve-nodes/host1/web") == mine
        assert set(second.node_snapshot("host1").instances) == {i.key for i in own}

        no_write_back(first)  # taken over, still open: it would put back what goes now
        second.deregister("web", own[0].id)
        assert not [c for c in zk.get_children(folder) if c.startswith(f"{own[0].id}_")]
        assert zk.get_children(f"{base}/nerve-nodes/host1/web") == []
        assert set(second.node_snapshot("host1").instances) == {own[1].key}
    finally:
        first.close(revoke=False)
        second.close()


def test_a_successor_adopts_nodes_the_index_does_not_name(zk_single: ServerCluster,
                                                          zk: KazooClient) -> None:
    """A node's first read lists every directory too (and reads the data of the node's own
    names): a predecessor's nodes the index does not name (written by a version before it, or
    created right before the predecessor died, its index node not yet) are adopted (else they
    would vanish with the old session before the checks pass again), and their old nodes
    removed from the service's directory (found in the index alone, they stayed: the instance
    twice). Then the index alone serves."""
    url, _, folder = layout(zk_single)
    base = url.split("?")[0].split("/", 3)[3]
    old = open_registry(url, ttl=4.0)
    new = open_registry(url, ttl=4.0)
    try:
        second = Instance(service="web", id="host1:00000000000b:8080", node="host1",
                          address="127.0.1.1", port=31002)
        old.register(inst(1))
        old.register(second)
        # another node's, named host12:…: listed, not read (its 4 KB), not ours
        old.register(inst(12, meta={f"blob{n}": "x" * 512 for n in range(8)}))
        index = f"/{base}/nerve-nodes/host1/web"
        unnamed = [c for c in zk.get_children(index) if c.startswith(f"{second.id}_")]
        zk.delete(f"{index}/{unnamed[0]}")  # as if the predecessor died in between
        before = new.reads.counts()
        found = new.node_snapshot("host1").instances
        assert sorted(i.id for i in found.values()) == [inst(1).id, second.id]
        start = new.reads.counts() - before
        assert start.full_reads == 1 and start.bytes < 2048, start  # host12's data not read
        new.register(inst(1))  # adopted: a node and an index entry of the new session each
        new.register(second)
        session = new.client.client_id[0]  # type: ignore[attr-defined]
        children = [c for c in zk.get_children(folder) if c.startswith("host1:")]
        assert len(children) == 2, children
        assert {zk.exists(f"{folder}/{c}").ephemeralOwner for c in children} == {session}
        before = new.reads.counts()
        assert len(new.node_snapshot("host1").instances) == 2
        assert (new.reads.counts() - before).full_reads == 0
        assert new.node_snapshot("host9").instances == {}  # a node's first read: everything
        before = new.reads.counts()
        assert new.node_snapshot("host9").instances == {}  # then the index alone
        assert (new.reads.counts() - before).full_reads == 0
    finally:
        old.close(revoke=False)
        new.close()


class LostAnswer:
    """A kazoo async result whose request the server applied but whose answer never came."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def get(self, timeout: float | None = None) -> Any:
        self.real.get(timeout=timeout)
        raise ConnectionLoss()


def test_a_create_whose_answer_was_lost_leaves_one_node(zk_single: ServerCluster,
                                                         zk: KazooClient) -> None:
    """The first create of an instance's sequential node is applied, its answer lost: the
    registry tries again in the same session. The node it never heard of is removed at once
    (it stayed for the session: the instance twice to Synapse), and a deregister looks in the
    service's directory too (it looked in the index only: that node outlived the instance)."""
    url, _, folder = layout(zk_single)
    registry = open_registry(url, ttl=4.0)
    client = registry.client  # type: ignore[attr-defined]
    real, lost = client.create_async, [1]

    def create_async(path: str, *args: Any, **kw: Any) -> Any:
        answer = real(path, *args, **kw)
        if kw.get("sequence") and lost:
            lost.pop()
            return LostAnswer(answer)
        return answer

    client.create_async = create_async
    try:
        registry.register(inst(1))
        assert not lost  # the lost answer happened
        assert len(zk.get_children(folder)) == 1, zk.get_children(folder)
        registry.deregister("web", inst(1).id)
        assert zk.get_children(folder) == []
    finally:
        client.create_async = real
        registry.close()


def test_an_index_zookeeper_refuses_is_turned_off(zk_single: ServerCluster,
                                                  zk: KazooClient) -> None:
    """A Nerve fleet's ACLs may keep us out of ``<prefix>/nerve-nodes``: registering works as
    it did before the index (it failed after the instance's node was written, at every try),
    and node reads read everything, with one warning."""
    url, _, folder = layout(zk_single)
    base = url.split("?")[0].split("/", 3)[3]
    zk.add_auth("digest", "ops:secret")
    zk.ensure_path(f"/{base}")  # open, as Nerve's tree; its parents' ACL would be this one's
    zk.create(f"/{base}/nerve-nodes", acl=[make_digest_acl("ops", "secret", all=True)])
    registry = open_registry(url, ttl=4.0)
    try:
        registry.register(inst(1))
        assert [c.rsplit("_", 1)[0] for c in zk.get_children(folder)] == [inst(1).id]
        found = registry.node_snapshot("host1").instances
        assert [i.id for i in found.values()] == [inst(1).id]
        before = registry.reads.counts()
        registry.node_snapshot("host1")
        assert (registry.reads.counts() - before).full_reads == 1  # the index is off
        registry.deregister("web", inst(1).id)
        assert zk.get_children(folder) == []
    finally:
        registry.close()


def test_with_no_index_a_node_read_takes_no_node_nerve_wrote(zk_single: ServerCluster,
                                                              zk: KazooClient) -> None:
    """Services right under the prefix leave no room for the index: every node read lists the
    whole registry and reads the nodes named as the agent names them, its own. Nodes Nerve
    wrote are not its own, even labelled with its node or named ``<node>:…`` (read as its own
    before, a reconcile re-registered them draining or deleted Nerve's live node)."""
    host, port = zk_single.address(0)
    base = f"{unique_prefix()}/nerve/services"
    registry = open_registry(f"zk://{host}:{port}{base}?format=nerve", ttl=4.0)
    try:
        registry.register(inst(1))
        labelled = b'{"host":"127.0.2.1","port":8080,"name":"i-0abc","labels":{"node":"host1"}}'
        nerve_write(zk, f"{base}/web", "i-0abc", labelled)
        nerve_write(zk, f"{base}/web", "host1:web", b'{"host":"127.0.2.2","port":8080}')
        assert len(registry.snapshot().instances) == 3
        before = registry.reads.counts()
        assert set(registry.node_snapshot("host1").instances) == {inst(1).key}
        assert (registry.reads.counts() - before).full_reads == 1  # no index
    finally:
        registry.close()


def nerve_write(zk: KazooClient, folder: str, instance_id: str, data: bytes) -> str:
    """What Nerve's ZooKeeper reporter does: mkdir -p, then an ephemeral sequential node."""
    zk.ensure_path(folder)
    created: str = zk.create(f"{folder}/{instance_id}_", data, ephemeral=True, sequence=True)
    return created


def test_nodes_written_by_nerve_are_read_and_bad_ones_skipped(
        zk_single: ServerCluster, zk: KazooClient, tmp_path: Path) -> None:
    url, template, folder = layout(zk_single)
    old = nerve_write(zk, folder, "i-0a1b2c",
                      b'{"host":"127.0.2.1","port":8080,"name":"i-0a1b2c"}')
    nerve_write(zk, folder, "i-0a1b2c",  # the same Nerve host, a second port
                b'{"host":"127.0.2.1","port":8081,"name":"i-0a1b2c","weight":5,'
                b'"haproxy_server_options":"backup","labels":{"az":"us-east-1a"}}')
    bad = {"not-json": b"{host", "no-port": b'{"host":"127.0.2.9","name":"x"}',
           "hostname": b'{"host":"web.example.com","port":80,"name":"x"}',
           "huge": b'{"host":"127.0.2.9","port":80,"pad":"' + b"x" * 70_000 + b'"}'}
    bad_paths = {nerve_write(zk, folder, name, data) for name, data in bad.items()}
    nerve_write(zk, template.replace("{service}", "db"), "i-0d0d0d",
                b'{"host":"127.0.2.4","port":5432,"name":"i-0d0d0d"}')

    cli = subprocess.run([sys.executable, "-m", "discovery", "--log-level", "warning",
                          "services", "--registry", url,
                          "-o", "json"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    listed = json.loads(cli.stdout)
    assert sorted({i["service"] for i in listed}) == ["db", "web"]
    web = {(i["address"], i["port"]): i for i in listed if i["service"] == "web"}
    assert set(web) == {("127.0.2.1", 8080), ("127.0.2.1", 8081)}
    assert web[("127.0.2.1", 8080)]["id"] == "i-0a1b2c:8080"
    assert web[("127.0.2.1", 8081)]["weight"] == 5
    assert web[("127.0.2.1", 8081)]["meta"] == {"az": "us-east-1a"}
    assert {i["state"] for i in web.values()} == {"up"}
    for path in bad_paths:
        assert cli.stderr.count(path) == 1, f"one warning naming {path}:\n{cli.stderr}"

    with Client(url) as client:
        seen: list[set[tuple[str, int]]] = []
        client.watch("web", lambda found: seen.append({(i.address, i.port) for i in found}))
        assert client.instances("web")  # the live catalog is loaded
        # Nerve restarts on host i-0a1b2c: a new node next to the old, then the old one goes
        nerve_write(zk, folder, "i-0a1b2c",
                    b'{"host":"127.0.2.1","port":8080,"name":"i-0a1b2c"}')
        zk.delete(old)
        nerve_write(zk, folder, "i-0e0e0e", b'{"host":"127.0.2.5","port":80,"name":"i-0e0e0e"}')
        wait_for(lambda: seen and seen[-1] == {("127.0.2.1", 8080), ("127.0.2.1", 8081),
                                               ("127.0.2.5", 80)}, 20,
                 message="the client follows Nerve's nodes")
        assert all(("127.0.2.1", 8080) in s for s in seen)  # never lost across the restart
