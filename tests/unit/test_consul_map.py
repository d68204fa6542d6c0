"""The Consul-compatible endpoints and Prometheus SD labels, answered in-process (no socket)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from discovery.errors import ConfigError
from discovery.lookup.consul import label_name, parse_datacenter, sd_labels
from discovery.lookup.http import HttpApi
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot

PROM_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def inst(n: int, *, state: State = State.UP, **kw: Any) -> Instance:
    return Instance(service="web", id=f"h{n}:{n:012x}:80", node=f"h{n}", address=f"192.0.2.{n}",
                    port=8000 + n, state=state, **kw)


@pytest.fixture
def api() -> HttpApi:
    cat = Catalog()
    members = [inst(1, tags=("blue",), meta={"version": "1.4"}), inst(2, state=State.DRAINING)]
    cat.load(Snapshot({i.key: i for i in members}))
    return HttpApi(cat, dict, None, datacenter="eu-1", node="h9")


def answer(api: HttpApi, target: str) -> tuple[int, Any, dict[str, str]]:
    resp = api.handle(target)
    return resp.status, json.loads(resp.body), resp.headers


def test_health_service_shape_passing_and_index(api: HttpApi) -> None:
    status, body, headers = answer(api, "/v1/health/service/web")
    assert api.catalog is not None
    assert status == 200 and headers["X-Consul-Index"] == str(api.catalog.index)
    assert headers["X-Discovery-Index"] == headers["X-Consul-Index"]  # one index, one source
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"] == "0"
    first, second = body
    assert first["Service"]["ID"] == "h1:000000000001:80" and first["Service"]["Port"] == 8001
    assert first["Service"]["Tags"] == ["blue"] and first["Service"]["Meta"] == {"version": "1.4"}
    assert first["Node"]["Node"] == "h1" and first["Node"]["Datacenter"] == "eu-1"
    assert [c["Status"] for c in first["Checks"]] == ["passing"]
    assert [c["Status"] for c in second["Checks"]] == ["critical"]  # draining
    _, passing, _ = answer(api, "/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == ["h1:000000000001:80"]


def test_catalog_endpoints_and_agent_self(api: HttpApi) -> None:
    assert answer(api, "/v1/catalog/services")[1] == {"web": ["blue"]}
    _, entries, _ = answer(api, "/v1/catalog/service/web?tag=blue")
    assert [(e["ServiceAddress"], e["ServicePort"], e["ServiceName"]) for e in entries] == [
        ("192.0.2.1", 8001, "web")]
    assert answer(api, "/v1/agent/self")[1]["Config"]["Datacenter"] == "eu-1"
    assert answer(api, "/v1/catalog/datacenters")[1] == ["eu-1"]


@pytest.mark.parametrize("target", ["/v1/agent/self", "/v1/catalog/datacenters",
                                    "/v1/catalog/services", "/v1/catalog/service/web",
                                    "/v1/health/service/web?passing"])
def test_a_consul_token_parameter_is_ignored_as_its_header_is(api: HttpApi, target: str) -> None:
    join = "&" if "?" in target else "?"
    assert answer(api, f"{target}{join}token=s3cr3t")[:2] == answer(api, target)[:2]


@pytest.mark.parametrize("target", ["/v1/health/service/nope", "/v1/catalog/service/nope",
                                    "/v1/health/service/NOT%20A%20NAME",
                                    "/v1/health/service/web?tag=green"])
def test_unknown_service_is_consuls_empty_answer(api: HttpApi, target: str) -> None:
    status, body, _ = answer(api, target)
    assert (status, body) == (200, [])


@pytest.mark.parametrize(("target", "param"), [
    ("/v1/health/service/web?index=abc", "index"), ("/v1/health/service/web?index=-1", "index"),
    ("/v1/health/service/web?wait=forever", "wait"), ("/v1/health/service/web?passing=maybe",
                                                      "passing"),
    ("/v1/catalog/services?dc=us-2", "dc"), ("/v1/catalog/services?stale&consistent", "stale"),
    ("/v1/catalog/services?passing=1", "passing"), ("/v1/prometheus/sd?up=2", "up"),
    # a service or tag nothing can match: not an empty list (Prometheus would drop every target)
    ("/v1/prometheus/sd?service=WEB", "service"), ("/v1/prometheus/sd?service=", "service"),
    ("/v1/prometheus/sd?tag=V1", "tag"),
    # each of up and passing read, also when the other is true
    ("/v1/prometheus/sd?up=yes&passing=bogus", "passing"),
    ("/v1/services?up=1&passing=bogus", "passing"),
    ("/v1/services/web?passing=1&up=maybe", "up"),
])
def test_malformed_parameters_are_400_naming_them(api: HttpApi, target: str, param: str) -> None:
    status, body, _ = answer(api, target)
    assert status == 400 and body["param"] == param


def test_datacenter_on_every_consul_endpoint_as_the_go_client_sends_it(api: HttpApi) -> None:
    for target in ("/v1/agent/self", "/v1/catalog/datacenters", "/v1/catalog/services"):
        assert answer(api, f"{target}?dc=eu-1")[0] == 200, target
        status, body, _ = answer(api, f"{target}?dc=us-2")
        assert status == 400 and body["param"] == "dc", target


def test_wait_in_go_duration_form(api: HttpApi) -> None:
    """Consul reads wait with Go's time.ParseDuration: 1m30s and 5m0s are waits too."""
    from discovery.lookup.http_query import blocking_params
    assert blocking_params({"wait": ["1m30s"]}) == (None, 90.0)
    assert blocking_params({"wait": ["50ms"]}) == (None, 0.05)
    assert api.catalog is not None
    index = api.catalog.index
    status, _, headers = answer(api, f"/v1/health/service/web?index={index}&wait=0m0.05s")
    assert status == 200 and headers["X-Consul-Index"] == str(index)
    assert answer(api, "/v1/health/service/web?wait=1m30")[0] == 400


def test_sd_index_is_read_before_the_data(api: HttpApi, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    catalog = api.catalog
    assert catalog is not None
    real = catalog.instances

    def then_a_change(*args: Any, **kw: Any) -> Any:
        found = real(*args, **kw)
        catalog.load(Snapshot({i.key: i for i in (inst(1), inst(2), inst(3))}))  # index moves
        return found

    before = catalog.index
    monkeypatch.setattr(catalog, "instances", then_a_change)
    status, body, headers = answer(api, "/v1/prometheus/sd")
    assert status == 200 and len(body) == 2 and headers["X-Discovery-Index"] == str(before)


def test_blocking_query_on_the_current_index_waits_out_wait(api: HttpApi) -> None:
    assert api.catalog is not None
    index = api.catalog.index
    started = time.monotonic()
    status, _, headers = answer(api, f"/v1/health/service/web?index={index}&wait=50ms")
    assert status == 200 and headers["X-Consul-Index"] == str(index)
    assert time.monotonic() - started >= 0.04  # held for the wait


@pytest.mark.parametrize("path", ["/v1/catalog/services", "/v1/catalog/service/web",
                                  "/v1/health/service/web"])
def test_a_bad_parameter_is_400_before_a_blocking_wait(api: HttpApi, path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter is checked before the query blocks: a bad ``pretty`` was a 400 only
    once the wait was over (5 minutes by default, holding a blocking slot)."""
    assert api.catalog is not None and api.consul is not None
    blocked: list[float] = []

    def block(catalog: Catalog, req: Any, index: int | None, wait: float, *_: Any) -> int:
        blocked.append(wait)
        return catalog.index
    monkeypatch.setattr(api.consul, "block", block)
    status, body, _ = answer(api, f"{path}?index={api.catalog.index}&wait=2s&pretty=bogus")
    assert (status, body["param"], blocked) == (400, "pretty", [])
    assert answer(api, f"{path}?index={api.catalog.index}&wait=2s&pretty=1")[0] == 200
    assert blocked == [2.0]


def test_sd_labels_are_valid_prometheus_names_and_strings() -> None:
    one = inst(1, tags=("a", "b"), meta={"build.id": "7", "build_id": "8", "x-y": "z"})
    labels = sd_labels(one)
    assert all(PROM_LABEL.fullmatch(k) for k in labels)
    assert all(isinstance(v, str) for v in labels.values())
    assert labels["__meta_discovery_tags"] == ",a,b,"
    assert labels["__meta_discovery_meta_build_id"] == "7"  # first in sorted order wins
    assert labels["__meta_discovery_meta_x_y"] == "z"
    assert label_name("a.b-c_D9") == "a_b_c_D9"


def test_sd_targets_bracket_ipv6(api: HttpApi) -> None:
    cat = Catalog()
    six = Instance(service="v6", id="h1:0000000000aa:80", node="h1", address="fd00::5", port=81)
    cat.load(Snapshot({six.key: six}))
    _, groups, _ = answer(HttpApi(cat, dict, None), "/v1/prometheus/sd")
    assert groups == [{"targets": ["[fd00::5]:81"], "labels": sd_labels(six)}]


@pytest.mark.parametrize("bad", ["", "DC1", "dc 1", "-dc", "x" * 64])
def test_datacenter_names(bad: str) -> None:
    assert parse_datacenter("dc1") == "dc1" and parse_datacenter("eu_west-2") == "eu_west-2"
    with pytest.raises(ConfigError, match="--datacenter"):
        parse_datacenter(bad)
