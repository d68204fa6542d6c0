"""Tools that speak Consul, unmodified, against ``discovery dns --http`` on loopback.

A real ``discovery dns`` process follows a real etcd; the clients are ones nobody here wrote:
Prometheus (``http_sd_configs`` on ``/v1/prometheus/sd``) and the py-consul library (agent/self
for the datacenter, catalog, health with ``passing`` and ``tag``, a blocking query with
``index``). Debian's Prometheus is built without ``consul_sd_configs`` (its changelog: "Disable
Consul SD until its Debian package is back in shape"), so Consul's API is proved with py-consul.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from discovery.model import Instance, State
from discovery.registry import Registry, open_registry
from tests.harness.agent import DiscoveryProcess
from tests.harness.prometheus import Prometheus
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration
DC = "dc7"


def inst(service: str, n: int, *, tags: tuple[str, ...] = (), meta: dict[str, str] | None = None,
         state: State = State.UP) -> Instance:
    return Instance(service=service, id=f"n{n}:{n:012x}:80", node=f"n{n}",
                    address=f"127.0.0.{n}", port=9000 + n, tags=tags, meta=meta or {},
                    state=state)


class Stack:
    """A registry to write to, and ``discovery dns --http`` reading it."""

    def __init__(self, url: str, registry: Registry, proc: DiscoveryProcess, http: int) -> None:
        self.url, self.registry, self.proc, self.http = url, registry, proc, http

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def stack(etcd_single: ServerCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    etcd_single.ensure_running()
    url = etcd_single.url(unique_prefix())
    http = free_port()
    proc = DiscoveryProcess(["dns", "--registry", url, "--listen", f"127.0.0.1:{free_port()}",
                             "--http", f"127.0.0.1:{http}", "--datacenter", DC],
                            "dns", tmp_path_factory.mktemp("consul")).start()
    registry = open_registry(url, timeout=5.0)
    stack = Stack(url, registry, proc, http)
    try:
        wait_for(lambda: stack.get("/v1/health")[0] == 200, 30, message="discovery dns up")
        yield stack
    finally:
        registry.close()
        proc.terminate()
        print(f"----- discovery dns log -----\n{proc.log()[-4000:]}")


def test_prometheus_http_sd_follows_the_catalog(stack: Stack, tmp_path: Path) -> None:
    web1 = inst("web", 1, tags=("blue", "v2"), meta={"version": "1.4", "build.id": "77"})
    web2 = inst("web", 2)
    db = inst("db", 3, state=State.DRAINING)
    for i in (web1, web2, db):
        stack.registry.register(i)
    prom = Prometheus(f"""
global: {{scrape_interval: 1h, scrape_timeout: 10s}}
scrape_configs:
  - job_name: http
    http_sd_configs: [{{url: "http://127.0.0.1:{stack.http}/v1/prometheus/sd",
                        refresh_interval: 1s}}]
""", tmp_path).start()
    try:
        expect = {"127.0.0.1:9001", "127.0.0.2:9002", "127.0.0.3:9003"}
        wait_for(lambda: prom.addresses("http") == expect, 40, interval=0.25,
                 message=f"Prometheus lists {expect}")
        by_addr = {t["__address__"]: t for t in prom.targets("http")}
        first = by_addr["127.0.0.1:9001"]
        assert first["__meta_discovery_service"] == "web"
        assert first["__meta_discovery_node"] == "n1"
        assert first["__meta_discovery_id"] == web1.id
        assert first["__meta_discovery_tags"] == ",blue,v2,"
        assert first["__meta_discovery_meta_version"] == "1.4"
        assert first["__meta_discovery_meta_build_id"] == "77"  # sanitised label name
        assert first["__meta_discovery_state"] == "up"
        assert "__meta_discovery_tags" not in by_addr["127.0.0.2:9002"]  # empty: no label
        assert by_addr["127.0.0.3:9003"]["__meta_discovery_state"] == "draining"

        stack.registry.register(inst("web", 4, tags=("green",)))
        stack.registry.deregister("web", web1.id)
        expect = {"127.0.0.2:9002", "127.0.0.3:9003", "127.0.0.4:9004"}
        wait_for(lambda: prom.addresses("http") == expect, 40, interval=0.25,
                 message=f"Prometheus follows the change to {expect}")
    except AssertionError:
        print(f"----- prometheus log -----\n{prom.log()}")
        raise
    finally:
        prom.stop()
        for service, n in ("web", 2), ("web", 4), ("db", 3):
            stack.registry.deregister(service, inst(service, n).id)
        # the last up instance of a service goes after the wipe guard's settle (0.2 s): the next
        # test's blocking query must not see this test's removals land
        wait_for(lambda: stack.get("/v1/catalog/services")[1] == {}, 10,
                 message="this test's instances gone from the catalog")


def test_py_consul_catalog_health_and_blocking_query(stack: Stack) -> None:
    up1, up2 = inst("pay", 11, tags=("v1",)), inst("pay", 12, tags=("v2",))
    down = inst("pay", 13, state=State.DRAINING)
    for i in (up1, up2, down):
        stack.registry.register(i)
    client = consul.Consul(host="127.0.0.1", port=stack.http)
    wait_for(lambda: len(client.health.service("pay")[1]) == 3, 20, message="pay in the API")

    assert client.agent.self()["Config"]["Datacenter"] == DC
    index, services = client.catalog.services()
    assert services["pay"] == ["v1", "v2"]
    _, everyone = client.catalog.service("pay")
    assert {e["ServiceID"] for e in everyone} == {up1.id, up2.id, down.id}
    _, passing = client.health.service("pay", passing=True)
    assert sorted(e["Service"]["ID"] for e in passing) == sorted([up1.id, up2.id])
    assert {c["Status"] for e in passing for c in e["Checks"]} == {"passing"}
    _, tagged = client.health.service("pay", tag="v2", passing=True)
    assert [(e["Service"]["Address"], e["Service"]["Port"]) for e in tagged] == [
        ("127.0.0.12", 9012)]
    assert client.health.service("no-such-service")[1] == []  # Consul's empty answer
    with pytest.raises(consul.ConsulException, match="400"):
        client.health.service("pay", index="12x", wait="1s")

    index, _ = client.health.service("pay", passing=True)
    result: dict[str, Any] = {}
    written = threading.Event()

    def block() -> None:
        result["answer"] = client.health.service("pay", index=index, wait="20s", passing=True)
        result["after_write"] = written.is_set()

    waiter = threading.Thread(target=block)
    waiter.start()
    time.sleep(0.5)  # give the query time to block; the assertion below proves it did
    assert waiter.is_alive(), "the blocking query answered before anything changed"
    written.set()
    stack.registry.register(inst("pay", 14))
    waiter.join(20)
    new_index, entries = result["answer"]
    assert result["after_write"] and int(new_index) > int(index)
    assert inst("pay", 14).id in {e["Service"]["ID"] for e in entries}
    for n in (11, 12, 13, 14):
        stack.registry.deregister("pay", inst("pay", n).id)


def test_py_consul_sees_errors_not_absence_and_matches_case_as_consul(stack: Stack) -> None:
    """Unserved Consul endpoints are 501 (py-consul raises instead of returning None: "key
    absent"); names and tags match case-insensitively, as Consul's."""
    stack.registry.register(inst("mail", 21, tags=("smtp",)))
    client = consul.Consul(host="127.0.0.1", port=stack.http)
    try:
        wait_for(lambda: len(client.health.service("mail")[1]) == 1, 20, message="mail")
        assert [e["Service"]["ID"] for e in client.health.service("MAIL", tag="SMTP")[1]] == [
            inst("mail", 21).id]
        with pytest.raises(consul.ConsulException, match="501"):
            client.kv.get("foo")
        with pytest.raises(consul.ConsulException, match="501"):
            client.status.leader()
    finally:
        stack.registry.deregister("mail", inst("mail", 21).id)


def test_index_survives_a_restart_and_no_catalog_is_an_error(
        etcd_single: ServerCluster, tmp_path: Path) -> None:
    """A restarted process never gives a client its old index back (the change would be missed
    for good); one that has no catalog yet (registry unreachable) answers Consul's 500."""
    etcd_single.ensure_running()
    url = etcd_single.url(unique_prefix())
    registry = open_registry(url, timeout=5.0)
    registry.register(inst("cal", 31))
    indexes = []
    try:
        for _ in range(2):
            http = free_port()
            proc = DiscoveryProcess(["dns", "--registry", url, "--listen",
                                     f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{http}"],
                                    "dns", tmp_path).start()
            try:
                client = consul.Consul(host="127.0.0.1", port=http)

                def cal_index(c: consul.Consul = client) -> str | None:
                    index, entries = c.health.service("cal")
                    return str(index) if entries else None

                indexes.append(int(wait_for(cal_index, 30, message="cal in the API") or 0))
            finally:
                proc.terminate()
        assert indexes[1] > indexes[0]
        http = free_port()
        away = f"etcd://127.0.0.1:{free_port()}/nowhere"  # nothing listens there
        proc = DiscoveryProcess(["dns", "--registry", away, "--listen",
                                 f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{http}"],
                                "dns", tmp_path).start()
        try:
            client = consul.Consul(host="127.0.0.1", port=http)
            wait_for(lambda: client.agent.self(), 30, message="the HTTP API up")
            with pytest.raises(consul.ConsulException, match="No cluster leader"):
                client.health.service("cal")
            with pytest.raises(consul.ConsulException, match="500"):
                client.catalog.services()
        finally:
            proc.terminate()
    finally:
        registry.deregister("cal", inst("cal", 31).id)
        registry.close()
