"""What Consul's clients (Prometheus consul_sd, consul-template, py-consul, Go's api) read from
the Consul-compatible endpoints in the corner cases: restarts, no catalog yet, the registry
lost, case, weight 0, many blocking queries, endpoints we do not serve. In-process, no socket
(the restart test runs two processes). What is new since the fixes is imported where used,
so that each test fails on its own against the code before them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from discovery.lookup.http import HttpApi
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot


def inst(n: int, *, service: str = "web", **kw: Any) -> Instance:
    return Instance(service=service, id=f"h{n}:{n:012x}:80", node=f"h{n}",
                    address=f"192.0.2.{n}", port=8000 + n, **kw)


def loaded(*members: Instance) -> Catalog:
    cat = Catalog()
    cat.load(Snapshot({i.key: i for i in members}, revision=3))
    return cat


def answer(api: HttpApi, target: str) -> tuple[int, Any, dict[str, str]]:
    resp = api.handle(target)
    return resp.status, json.loads(resp.body), resp.headers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- P1: the index never repeats across restarts ---------------------------------------------

ONE_PROCESS = """
import json
from discovery.lookup.http import HttpApi
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot
i = Instance(service="web", id="h1:000000000001:80", node="h1", address="192.0.2.1", port=80)
cat = Catalog()
cat.load(Snapshot({i.key: i}, revision=1))
api = HttpApi(cat, dict, None)
print(json.dumps([api.handle(p).headers for p in ("/v1/health/service/web", "/v1/services",
                                                 "/v1/prometheus/sd")]))
"""


def test_index_never_repeats_across_a_restart_and_is_one_source() -> None:
    """Two processes (a restart) with the same data: the second's index is above the first's,
    so a client holding the first's index sees a change instead of blocking on "the same"."""
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", ONE_PROCESS], capture_output=True,
                             text=True, timeout=60, check=True)
        runs.append(json.loads(out.stdout))
        time.sleep(0.01)
    for consul_h, native_h, sd_h in runs:
        index = int(consul_h["X-Consul-Index"])
        assert native_h["X-Discovery-Index"] == sd_h["X-Discovery-Index"] == str(index)
        assert consul_h["X-Discovery-Index"] == str(index)
        assert 2**40 < index < 2**53  # JSON clients (float64) keep it exact
    assert int(runs[1][0]["X-Consul-Index"]) > int(runs[0][0]["X-Consul-Index"])


def test_index_only_moves_up_and_an_earlier_process_index_answers_at_once() -> None:
    from discovery.model.catalog import CLOCK_BASE

    cat = loaded(inst(1))
    api = HttpApi(cat, dict, None)
    first = cat.index
    assert first > CLOCK_BASE
    api.handle("/v1/services")
    HttpApi(cat, dict, None)  # another API over it changes nothing
    assert cat.index == first
    cat.load(Snapshot({i.key: i for i in (inst(1), inst(2))}))
    assert cat.index == first + 1
    started = time.monotonic()
    status, _, headers = answer(api, "/v1/health/service/web?index=2&wait=5s")  # old process
    assert status == 200 and headers["X-Consul-Index"] == str(first + 1)
    assert time.monotonic() - started < 2


# ---- P2: no catalog yet is an error, not an empty answer ---------------------------------------

@pytest.mark.parametrize(("target", "status"), [
    ("/v1/health/service/web", 500), ("/v1/health/service/web?passing", 500),
    ("/v1/catalog/services", 500), ("/v1/catalog/service/web", 500),
    ("/v1/services", 503), ("/v1/services/web", 503), ("/v1/prometheus/sd", 503)])
def test_before_the_first_snapshot_reads_are_errors(target: str, status: int) -> None:
    api = HttpApi(Catalog(), dict, None)
    got, body, headers = answer(api, target)
    assert got == status, body
    assert ("No cluster leader" in body["error"]) == (status == 500)
    assert "first snapshot" in body["error"]
    assert headers.get("Retry-After", "1") == "1"
    assert answer(api, "/v1/agent/self")[0] == 200  # configuration, not the catalog


def test_a_blocking_query_before_the_first_snapshot_answers_when_it_loads() -> None:
    cat = Catalog()
    api = HttpApi(cat, dict, None)
    index = cat.index
    got: list[tuple[int, Any, dict[str, str]]] = []
    waiter = threading.Thread(target=lambda: got.append(
        answer(api, f"/v1/health/service/web?index={index}&wait=10s")))
    waiter.start()
    deadline = time.monotonic() + 5
    while api.blocked == 0:  # polled: it holds a blocking slot, waiting for the load
        assert time.monotonic() < deadline and waiter.is_alive(), got
        time.sleep(0.01)
    cat.load(Snapshot())  # an empty registry: loading is news all the same
    waiter.join(5)
    status, body, headers = got[0]
    assert (status, body) == (200, []) and int(headers["X-Consul-Index"]) > index


# ---- P3: the leader headers follow the registry connection -------------------------------------

def test_known_leader_and_last_contact_follow_the_registry() -> None:
    from discovery.lookup.consul import Contact

    up = [True]
    clock = Clock()
    contact = Contact(lambda: up[0], clock)
    api = HttpApi(loaded(inst(1)), dict, None, contact=contact)
    _, _, headers = answer(api, "/v1/health/service/web")
    assert (headers["X-Consul-KnownLeader"], headers["X-Consul-LastContact"]) == ("true", "0")
    up[0] = False
    contact.changed(False)
    clock.now += 2.5
    status, body, headers = answer(api, "/v1/health/service/web")
    assert status == 200 and len(body) == 1  # the last known catalog, by default
    assert (headers["X-Consul-KnownLeader"], headers["X-Consul-LastContact"]) == ("false",
                                                                                   "2500")
    assert answer(api, "/v1/catalog/services?stale")[0] == 200
    status, body, headers = answer(api, "/v1/health/service/web?consistent")
    assert status == 500 and "No cluster leader" in body["error"]
    assert headers["X-Consul-KnownLeader"] == "false"
    index = api.catalog.index  # type: ignore[union-attr]
    started = time.monotonic()  # a blocking consistent read: refused at once, not after wait
    status, _, _ = answer(api, f"/v1/health/service/web?consistent&index={index}&wait=5s")
    assert status == 500 and time.monotonic() - started < 1.0
    up[0] = True
    contact.changed(True)
    status, _, headers = answer(api, "/v1/health/service/web?consistent")
    assert status == 200 and headers["X-Consul-LastContact"] == "0"


def test_contact_follows_a_watchers_registry() -> None:
    from discovery.lookup.consul import Contact

    listeners: list[Any] = []

    class Registry:
        def add_state_listener(self, callback: Any) -> None:
            listeners.append(callback)

    class Watcher:
        registry = Registry()
        registry_connected = True

    watcher: Any = Watcher()
    contact = Contact.of(watcher)
    assert contact.last_contact() is None and len(listeners) == 1
    watcher.registry_connected = False
    listeners[0](False)
    time.sleep(0.02)
    lost = contact.last_contact()
    assert lost is not None and lost >= 10


# ---- P4: names and tags are matched as Consul matches them -------------------------------------

def test_service_names_and_tags_are_case_insensitive() -> None:
    """Our names and tags are lowercase DNS labels; Consul compares both case-insensitively
    (hashicorp/consul#5707, #9702), so a client asking for WEB or tag=Blue finds them."""
    api = HttpApi(loaded(inst(1, tags=("blue",)), inst(2, tags=("green",))), dict, None)
    for target in ("/v1/health/service/WEB?tag=blue", "/v1/health/service/Web?tag=BLUE",
                   "/v1/catalog/service/wEb?tag=bLuE"):
        _, body, _ = answer(api, target)
        ids = [e["Service"]["ID"] if "Service" in e else e["ServiceID"] for e in body]
        assert ids == [inst(1).id], target


# ---- P5: weight 0 as Consul can say it ---------------------------------------------------------

def test_weight_zero_is_passing_1_warning_0_with_a_warning_check() -> None:
    api = HttpApi(loaded(inst(1, weight=0), inst(2, weight=5),
                         inst(3, weight=0, state=State.DRAINING)), dict, None)
    _, body, _ = answer(api, "/v1/health/service/web")
    by_id = {e["Service"]["ID"]: e for e in body}
    zero = by_id[inst(1).id]
    assert zero["Service"]["Weights"] == {"Passing": 1, "Warning": 0}
    assert [c["Status"] for c in zero["Checks"]] == ["warning"]
    assert "weight 0" in zero["Checks"][0]["Notes"]
    assert by_id[inst(2).id]["Service"]["Weights"] == {"Passing": 5, "Warning": 1}
    assert [c["Status"] for c in by_id[inst(3).id]["Checks"]] == ["critical"]
    for entry in body:
        assert entry["Service"]["Weights"]["Passing"] >= 1  # Consul's ValidateWeights
    _, passing, _ = answer(api, "/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == [inst(2).id]
    _, catalog, _ = answer(api, "/v1/catalog/service/web")
    assert {e["ServiceID"]: e["ServiceWeights"]["Passing"] for e in catalog} == {
        inst(1).id: 1, inst(2).id: 5, inst(3).id: 1}


# ---- P6: enough blocking queries per client for consul_sd -------------------------------------

def test_blocking_slots_allow_consul_sd_watching_hundreds_of_services() -> None:
    api = HttpApi(loaded(inst(1)), dict, None)
    assert api.slots.per_client >= 200  # Consul's http_max_conns_per_client
    assert api.slots.total >= 2 * api.slots.per_client  # one client never takes them all
    for _ in range(api.slots.per_client):
        assert api.slots.acquire("127.0.0.1") is None
    assert api.slots.acquire("127.0.0.1") is not None  # still a limit
    assert api.slots.acquire("127.0.0.2") is None


# ---- P7: Consul's other endpoints are 501, not an "absent" 404 --------------------------------

@pytest.mark.parametrize("path", [
    "/v1/kv/foo", "/v1/kv/foo/bar?recurse", "/v1/agent/services", "/v1/agent/checks",
    "/v1/status/leader", "/v1/status/peers", "/v1/catalog/nodes", "/v1/catalog/node/h1",
    "/v1/health/checks/web", "/v1/health/state/any", "/v1/health/node/h1", "/v1/session/list",
    "/v1/acl/token/self", "/v1/event/list", "/v1/txn", "/v1/coordinate/nodes",
    "/v1/query", "/v1/operator/raft/configuration", "/v1/connect/ca/roots",
    "/v1/config/service-defaults", "/v1/internal/ui/services"])
def test_consul_endpoints_not_served_are_501(path: str) -> None:
    api = HttpApi(loaded(inst(1)), dict, None)
    status, body, _ = answer(api, path)
    assert status == 501 and "not implemented" in body["error"]


@pytest.mark.parametrize("path", ["/v1/health/x", "/v1/nosuch", "/v2/kv/foo", "/v1", "/kv/x",
                                  "/v1/kvx/foo"])
def test_other_unknown_paths_stay_404(path: str) -> None:
    assert HttpApi(loaded(inst(1)), dict, None).handle(path).status == 404


def test_served_paths_are_unchanged_and_an_agent_says_501_too() -> None:
    api = HttpApi(loaded(inst(1)), lambda: {"x": {"ok": True}}, None)
    for path in ("/v1/services", "/v1/services/web", "/v1/health", "/v1/agent/self",
                 "/v1/catalog/services", "/v1/catalog/datacenters", "/v1/prometheus/sd",
                 "/v1/health/service/web", "/v1/catalog/service/web"):
        assert api.handle(path).status == 200, path
    agent = HttpApi(None, dict, None)
    status, body, _ = answer(agent, "/v1/health/service/web")
    assert status == 501 and "agent" in body["error"]
    assert agent.handle("/v1/services").status == 404  # native: as before
    assert agent.handle("/v1/prometheus/sd").status == 404


# ---- a blocking query on one service waits for that service ----------------------------------

def test_a_blocking_query_on_a_service_waits_for_that_service_only() -> None:
    """Consul's per-service index: a query blocked on web is not answered when api changes
    (a fleet's churn elsewhere woke every blocked query on every host, consul_sd's one a
    service among them), and is when web changes, with web's index."""
    from discovery.registry.base import Change

    one = inst(1)
    cat = loaded(one, inst(2, service="api"))
    api = HttpApi(cat, dict, None)
    _, _, headers = answer(api, "/v1/health/service/web")
    index = int(headers["X-Consul-Index"])
    assert index == cat.modified("web") == cat.index  # both loaded at once
    got: list[tuple[int, Any, dict[str, str]]] = []
    waiter = threading.Thread(target=lambda: got.append(
        answer(api, f"/v1/health/service/web?index={index}&wait=10s")))
    waiter.start()
    deadline = time.monotonic() + 5
    while api.blocked == 0:  # polled: it holds a blocking slot
        assert time.monotonic() < deadline and waiter.is_alive(), got
        time.sleep(0.01)
    looks: list[str | None] = []  # the blocked query's looks at its service's index
    real_index_of = cat._index_of
    cat._index_of = lambda service: looks.append(service) or real_index_of(service)  # type: ignore[method-assign]
    for n in range(3, 8):  # api changes: web's query stays blocked, not even woken
        other = inst(n, service="api")
        cat.apply(Change("put", other.key, other, revision=n))
        waiter.join(0.05)  # an absence window: time for a woken waiter to look
    assert waiter.is_alive() and not got and cat.index == index + 5
    assert looks.count("web") <= 3, looks  # (its 0.5 s slice may end once meanwhile: 3)
    cat._index_of = real_index_of  # type: ignore[method-assign]
    assert cat.modified("web") == index and cat.modified("api") == index + 5
    two = inst(2)
    cat.apply(Change("put", two.key, two, revision=9))  # web changes: answered
    waiter.join(5)
    status, body, headers = got[0]
    assert status == 200 and len(body) == 2 and headers["X-Consul-Index"] == str(index + 6)
    # an index between web's and the catalog's (the client's of /v1/catalog/services) is
    # valid: it waits too, and an answer never goes behind it (a Consul client resets then)
    nine = inst(9, service="api")
    cat.apply(Change("put", nine.key, nine, revision=10))
    started = time.monotonic()
    status, _, headers = answer(api, f"/v1/health/service/web?index={cat.index}&wait=50ms")
    assert status == 200 and headers["X-Consul-Index"] == str(cat.index) == str(index + 7)
    assert time.monotonic() - started >= 0.04  # held for the wait
    cat.load(Snapshot({i.key: i for i in (one, two, inst(3, service="api"))}))
    assert cat.modified("web") == index + 6 and cat.modified("api") == cat.index  # a reset
    assert cat.modified("never") == index  # a service never seen: the first load's index
    cat.apply(Change("delete", inst(3, service="api").key, revision=12))  # api goes
    assert cat.modified("api") == cat.modified("never") == cat.index  # not kept, yet moved
    status, _, headers = answer(api, f"/v1/health/service/web?index={cat.index}&wait=0")
    assert headers["X-Consul-Index"] == str(cat.index)  # not behind it, even with no wait


def test_the_list_of_services_waits_for_a_service_or_a_tag_not_for_any_change() -> None:
    """``/v1/catalog/services`` (consul-template's ``services``, consul_sd, Traefik): a
    blocked query waited for any change anywhere, then sorted every instance to answer the
    same list (137 ms a query at 100,000 instances, a fleet's churn all day). Now it waits
    for a service that comes or goes or a tag that changes, and answers from counts kept by
    each change."""
    import random

    from discovery.model.catalog import LISTING
    from discovery.registry.base import Change

    cat = loaded(inst(1, tags=("a",)))
    api = HttpApi(cat, dict, None)
    _, body, headers = answer(api, "/v1/catalog/services")
    index = int(headers["X-Consul-Index"])
    assert body == {"web": ["a"]} and index == cat.modified(LISTING)
    got: list[tuple[int, Any, dict[str, str]]] = []
    waiter = threading.Thread(target=lambda: got.append(
        answer(api, f"/v1/catalog/services?index={index}&wait=10s")))
    waiter.start()
    deadline = time.monotonic() + 5
    while api.blocked == 0:
        assert time.monotonic() < deadline and waiter.is_alive(), got
        time.sleep(0.01)
    for n, kw in ((1, {"weight": 5, "tags": ("a",)}), (2, {"tags": ("a",)})):  # (not news)
        cat.apply(Change("put", inst(n).key, inst(n, **kw), revision=n))
        waiter.join(0.05)
    assert waiter.is_alive() and not got and cat.modified(LISTING) == index
    cat.apply(Change("put", inst(3, service="api").key, inst(3, service="api"), revision=3))
    waiter.join(5)
    status, body, headers = got[0]
    assert status == 200 and body == {"api": [], "web": ["a"]}
    assert headers["X-Consul-Index"] == str(cat.index)
    rng = random.Random(7)  # the kept counts are what every instance says, after any changes
    for step in range(300):
        one = inst(rng.randrange(12), service=rng.choice(["web", "api", "db"]),
                   tags=tuple(sorted(rng.sample(["a", "b", "c"], rng.randrange(3)))))
        kind = rng.choice(["put", "put", "delete"])
        cat.apply(Change(kind, one.key, one if kind == "put" else None, revision=10 + step))
        brute: dict[str, set[str]] = {}
        for i in cat.instances():
            brute.setdefault(i.service, set()).update(i.tags)
        assert cat.listing() == {s: sorted(t) for s, t in sorted(brute.items())}, step
