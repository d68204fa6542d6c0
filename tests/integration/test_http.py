"""The HTTP API on a real socket: lookups, blocking queries, health, metrics, hostile input."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery.errors import ConfigError
from discovery.lookup.http import HttpApi, parse_listen
from discovery.metrics import Metrics
from discovery.model.catalog import Catalog
from discovery.registry.base import Change
from tests.harness.client_calls import inst, sample_catalog
from tests.harness.util import free_port, wait_for

Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
def catalog() -> Catalog:
    return sample_catalog()


@pytest.fixture
def components() -> dict[str, dict[str, Any]]:
    return {"registry": {"ok": True, "url": "etcd://127.0.0.1:2379/discovery"},
            "haproxy": {"ok": True, "last_reload": None, "last_error": None}}


@pytest.fixture
def api(catalog: Catalog, components: dict[str, dict[str, Any]]) -> Iterator[HttpApi]:
    server = HttpApi(catalog, lambda: components, Metrics(), bind="127.0.0.1", port=free_port())
    server.start()
    yield server
    server.stop()


def get(api: HttpApi, path: str, method: str = "GET", timeout: float = 15,
        body: bytes | None = None, headers: dict[str, str] | None = None,
        source: str = "127.0.0.1") -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(api: HttpApi, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, body = get(api, path, **kw)
    assert headers["content-type"].startswith("application/json"), body
    return status, headers, json.loads(body)


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["id"] for i in items]


def test_binds_loopback_on_the_given_port(api: HttpApi) -> None:
    assert api.bind == "127.0.0.1" and api.port > 0
    assert get(api, "/v1/health")[0] == 200


def test_list_services(api: HttpApi, catalog: Catalog) -> None:
    status, headers, data = get_json(api, "/v1/services")
    assert status == 200
    assert headers["x-discovery-index"] == str(catalog.index)
    assert sorted(data["services"]) == ["db", "web"]
    assert len(data["services"]["web"]) == 3
    web = data["services"]["web"][0]
    assert web["address"] == "127.0.0.1" and web["port"] == 8001 and web["state"] == "up"
    _, _, up = get_json(api, "/v1/services?up=1")
    assert len(up["services"]["web"]) == 2
    _, _, blue = get_json(api, "/v1/services?tag=blue")
    assert list(blue["services"]) == ["web"]


def test_service_instances_with_state_and_filters(api: HttpApi) -> None:
    status, headers, data = get_json(api, "/v1/services/web")
    assert status == 200 and "x-discovery-index" in headers
    assert ids(data) == ["h1:000000000001:80", "h1:000000000002:80", "h1:000000000003:80"]
    assert [i["state"] for i in data] == ["up", "up", "draining"]
    assert ids(get_json(api, "/v1/services/web?up=1")[2]) == ids(data)[:2]
    assert ids(get_json(api, "/v1/services/web?passing")[2]) == ids(data)[:2]
    assert ids(get_json(api, "/v1/services/web?up=0")[2]) == ids(data)
    assert ids(get_json(api, "/v1/services/web?tag=blue")[2]) == [ids(data)[0], ids(data)[2]]
    assert ids(get_json(api, "/v1/services/web?tag=blue&tag=v2")[2]) == [ids(data)[0]]
    assert ids(get_json(api, "/v1/services/web?tag=blue&up=true")[2]) == [ids(data)[0]]
    assert get_json(api, "/v1/services/web?tag=red")[2] == []
    assert get_json(api, "/v1/services/nosuch")[:3:2] == (200, [])  # as Consul: empty, not 404
    pretty = get(api, "/v1/services/db?pretty")[2]
    assert pretty.startswith(b"[\n") and json.loads(pretty)[0]["service"] == "db"


def test_head_answers_without_body(api: HttpApi) -> None:
    status, headers, body = get(api, "/v1/services/web", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def apply_later(catalog: Catalog, change: Change, api: HttpApi) -> threading.Thread:
    """Apply ``change`` from another thread once a query is blocked; return the thread."""
    def run() -> None:
        wait_for(lambda: api.blocked >= 1, 5, 0.01, "a blocked query")
        catalog.apply(change)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_blocking_query_returns_early_on_change(api: HttpApi, catalog: Catalog) -> None:
    index = catalog.index
    new = inst("web", 9, tags=("blue",))
    thread = apply_later(catalog, Change("put", new.key, new, revision=11), api)
    started = time.monotonic()
    status, headers, data = get_json(api, f"/v1/services/web?index={index}&wait=10s")
    elapsed = time.monotonic() - started
    thread.join()
    assert status == 200
    assert elapsed < 1.5, elapsed  # well before the 10 s wait
    assert int(headers["x-discovery-index"]) == index + 1
    assert new.id in ids(data)


def test_blocking_query_on_the_list_and_a_delete(api: HttpApi, catalog: Catalog) -> None:
    index = catalog.index
    thread = apply_later(catalog, Change("delete", ("db", "h1:000000000004:80")), api)
    _, headers, data = get_json(api, f"/v1/services?index={index}&wait=10s")
    thread.join()
    assert int(headers["x-discovery-index"]) > index and "db" not in data["services"]


def test_blocking_query_times_out_without_change(api: HttpApi, catalog: Catalog) -> None:
    index = catalog.index
    started = time.monotonic()
    status, headers, data = get_json(api, f"/v1/services/web?index={index}&wait=300ms")
    elapsed = time.monotonic() - started
    assert status == 200 and int(headers["x-discovery-index"]) == index
    assert 0.28 <= elapsed < 2.0, elapsed
    assert len(data) == 3


@pytest.mark.parametrize("offset", [-1, 1])
def test_other_index_answers_at_once(api: HttpApi, catalog: Catalog, offset: int) -> None:
    """Older: something changed since. Newer (a restarted watcher): answer so clients reset."""
    started = time.monotonic()
    status, headers, _ = get_json(api, f"/v1/services?index={catalog.index + offset}&wait=10s")
    assert status == 200 and headers["x-discovery-index"] == str(catalog.index)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("query", "param"), [
    ("index=abc", "index"), ("index=-1", "index"), ("index=1.5", "index"),
    ("index=1&index=2", "index"), ("index=1&wait=soon", "wait"), ("wait=10x", "wait"),
    ("wait=-3s", "wait"), ("up=maybe", "up"), ("tag=Not_A_Tag", "tag"), ("tags=blue", "tags"),
])
def test_bad_parameters_are_400_naming_it(api: HttpApi, query: str, param: str) -> None:
    status, _, data = get_json(api, f"/v1/services/web?{query}")
    assert status == 400, data
    assert data["param"] == param and param in data["error"]
    assert "Traceback" not in data["error"]


def test_bad_service_name_is_400(api: HttpApi) -> None:
    status, _, data = get_json(api, "/v1/services/Bad%20Name")
    assert status == 400 and data["param"] == "service"


def test_wait_is_capped(api: HttpApi, catalog: Catalog) -> None:
    new = inst("db", 5)
    thread = apply_later(catalog, Change("put", new.key, new), api)
    status, _, _ = get_json(api, f"/v1/services?index={catalog.index}&wait=48h")
    thread.join()
    assert status == 200


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/service", "/v2/services", "/metricsx",
                                  "/v1/health/x", "/../../etc/passwd"])
def test_unknown_paths_are_404_json(api: HttpApi, path: str) -> None:
    status, _, data = get_json(api, path)
    assert status == 404 and "error" in data


def test_hostile_requests(api: HttpApi) -> None:
    status, headers, data = get_json(api, "/v1/services", method="POST", body=b"x")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert get_json(api, "/v1/services", method="DELETE")[0] == 405
    status, _, data = get_json(api, "/v1/services", body=b"{}" * 10)
    assert status == 413 and "bodies" in data["error"]
    status, _, data = get_json(api, "/v1/services?tag=" + "a" * 5000)
    assert status == 414 and "4096" in data["error"]
    status, _, data = get_json(api, "/v1/services?" + "&".join(f"p{i}=1" for i in range(40)))
    assert status == 400 and "32" in data["error"]
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):  # the server closes after an error
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and b"application/json" in head
    assert "error" in json.loads(body)


def test_health_ok_then_degraded(api: HttpApi, components: dict[str, dict[str, Any]]) -> None:
    status, _, data = get_json(api, "/v1/health")
    assert status == 200 and data["healthy"] is True
    assert data["components"]["registry"]["url"].startswith("etcd://")
    components["registry"]["ok"] = False
    components["haproxy"]["last_error"] = "haproxy -c failed: line 3"
    status, _, data = get_json(api, "/v1/health")
    assert status == 503 and data["healthy"] is False
    assert data["components"]["haproxy"]["last_error"] == "haproxy -c failed: line 3"


def test_health_callback_failure_is_503_without_traceback(catalog: Catalog) -> None:
    def broken() -> dict[str, dict[str, Any]]:
        raise RuntimeError("secret internals")
    server = HttpApi(catalog, broken, None, port=0).start()
    try:
        status, _, data = get_json(server, "/v1/health")
        assert status == 503 and data["healthy"] is False
        assert "secret" not in json.dumps(data) and "Traceback" not in json.dumps(data)
        assert get_json(server, "/metrics")[0] == 404  # no Metrics given
    finally:
        server.stop()


def test_metrics_endpoint_parses(api: HttpApi, catalog: Catalog) -> None:
    assert api.metrics is not None
    api.metrics.registered()
    api.metrics.dns_query("SRV", "NOERROR")
    status, headers, body = get(api, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("discovery_registrations", "discovery_dns_queries", "discovery_catalog_index",
                 "discovery_propagation_seconds", "discovery_registry_connected"):
        assert name in fams, name
    index = [s.value for s in fams["discovery_catalog_index"].samples]
    assert index == [catalog.index]
    assert [s.value for s in fams["discovery_catalog_instances"].samples] == [4]


def test_blocked_queries_do_not_block_other_endpoints(api: HttpApi, catalog: Catalog) -> None:
    index = catalog.index
    with ThreadPoolExecutor(max_workers=20) as pool:
        pending = [pool.submit(get, api, f"/v1/services/web?index={index}&wait=10s")
                   for _ in range(20)]
        wait_for(lambda: api.blocked == 20, 5, 0.01, "20 blocked queries")
        started = time.monotonic()
        assert get(api, "/v1/health", timeout=2)[0] == 200
        assert get(api, "/metrics", timeout=2)[0] == 200
        assert get(api, "/v1/services/db", timeout=2)[0] == 200
        assert time.monotonic() - started < 1.0
        new = inst("web", 7)
        catalog.apply(Change("put", new.key, new))
        for future in pending:
            status, headers, _ = future.result(timeout=5)
            assert status == 200 and int(headers["x-discovery-index"]) == index + 1


def test_too_many_blocking_queries_is_429(catalog: Catalog) -> None:
    server = HttpApi(catalog, dict, None, port=0, max_blocking=1).start()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(get, server, f"/v1/services?index={catalog.index}&wait=10s")
            wait_for(lambda: server.blocked == 1, 5, 0.01, "a blocked query")
            status, _, data = get_json(server, f"/v1/services?index={catalog.index}&wait=10s")
            assert status == 429 and "blocking" in data["error"]
            new = inst("db", 6)
            catalog.apply(Change("put", new.key, new))
            assert first.result(timeout=5)[0] == 200
    finally:
        server.stop()


def test_stop_releases_blocked_queries(catalog: Catalog) -> None:
    server = HttpApi(catalog, dict, None, port=0).start()
    port = server.port
    with ThreadPoolExecutor(max_workers=1) as pool:
        blocked = pool.submit(get, server, f"/v1/services?index={catalog.index}&wait=30s")
        wait_for(lambda: server.blocked == 1, 5, 0.01, "a blocked query")
        started = time.monotonic()
        server.stop()
        assert blocked.result(timeout=5)[0] == 200
        assert time.monotonic() - started < 3.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_agent_api_has_no_catalog() -> None:
    server = HttpApi(None, lambda: {"docker": {"ok": True}}, Metrics(), port=0).start()
    try:
        status, _, data = get_json(server, "/v1/services")
        assert status == 404 and "catalog" in data["error"]
        assert get_json(server, "/v1/health")[0] == 200
        assert get(server, "/metrics")[0] == 200
    finally:
        server.stop()


@pytest.mark.parametrize(("value", "expected"), [
    ("8500", ("127.0.0.1", 8500)), (":8500", ("127.0.0.1", 8500)),
    ("127.0.0.1:8500", ("127.0.0.1", 8500)), ("0.0.0.0:9000", ("0.0.0.0", 9000)),
    ("[::1]:8500", ("::1", 8500)), ("localhost:8500", ("127.0.0.1", 8500)),
])
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["", "host.example:80", "127.0.0.1:0", "127.0.0.1:99999",
                                   "127.0.0.1:http"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(value)


def test_foreign_host_is_421_and_ip_or_localhost_is_served(api: HttpApi) -> None:
    for host in ("evil.example.com", "evil.example.com:8500", "127.0.0.1.nip.io",
                 "localhost.evil.com", "[::1]x"):
        status, _, data = get_json(api, "/v1/services", headers={"Host": host})
        assert status == 421 and "rebinding" in data["error"], host
    for host in ("127.0.0.1", f"127.0.0.1:{api.port}", "localhost", f"LOCALHOST:{api.port}",
                 "[::1]:8500", "203.0.113.3:80"):
        assert get(api, "/v1/services", headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize(("query", "param"), [
    ("index=%C2%B2", "index"), ("index=%D9%A3", "index"), ("index=1&wait=%EF%BC%95s", "wait"),
])
def test_non_ascii_digits_are_400_naming_the_parameter(api: HttpApi, query: str,
                                                       param: str) -> None:
    status, _, data = get_json(api, f"/v1/services?{query}")
    assert status == 400 and data["param"] == param, data


def test_non_finite_values_are_null_not_nan(catalog: Catalog) -> None:
    components = {"haproxy": {"ok": True, "last_reload": float("nan"),
                              "reloads": [float("inf"), 1.5]}}
    server = HttpApi(catalog, lambda: components, None, port=0).start()
    try:
        status, _, body = get(server, "/v1/health")
        assert status == 200 and b"NaN" not in body and b"Infinity" not in body
        haproxy = json.loads(body)["components"]["haproxy"]
        assert haproxy["last_reload"] is None and haproxy["reloads"] == [None, 1.5]
    finally:
        server.stop()
