"""Propagation stages (propagation.py) and the status page's routes (lookup/ui.py), through
HttpApi.handle (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from discovery.agent.history import Cause, History
from discovery.lookup.http import HttpApi
from discovery.lookup.http_query import Request
from discovery.lookup.ui import CSP, Views
from discovery.metrics import Metrics
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry.base import Change

IID = "n1:0123456789ab:80"


def inst(**kw: Any) -> Instance:
    base: dict[str, Any] = {"service": "web", "id": IID, "node": "n1", "address": "192.0.2.1",
                            "port": 80}
    return Instance(**{**base, **kw})


def test_stages_from_the_record_stamps() -> None:
    metrics = Metrics()
    metrics.propagated(inst(seen_at=100.0, written_at=100.01, registered_at=100.01),
                       now=100.2, received=100.05)
    timing = metrics.stages.of("web", IID)
    assert timing is not None
    assert timing["event_to_write"] == pytest.approx(0.01)
    assert timing["write_to_received"] == pytest.approx(0.04)
    assert timing["received_to_applied"] == pytest.approx(0.15)
    assert timing["event_to_applied"] == pytest.approx(0.2)
    text = metrics.exposition().decode()
    assert 'discovery_propagation_stage_seconds_count{stage="write_to_received"} 1.0' in text
    summary = metrics.stages.summary()
    assert summary["received_to_applied"]["count"] == 1
    assert summary["received_to_applied"]["p50"] == pytest.approx(0.15)


def test_stages_skip_unknown_stamps_replays_and_clamp_skew() -> None:
    metrics = Metrics()
    assert metrics.stages.observe(inst(), received=10.0, applied=10.5) == {
        "received_to_applied": 0.5}  # an older record: no seen_at / written_at
    assert metrics.stages.observe(inst(written_at=1.0), received=1000.0, applied=1000.1) == {}
    skew = metrics.stages.observe(inst(written_at=50.0, seen_at=49.0), received=49.5,
                                  applied=49.6)
    assert skew["write_to_received"] == 0.0  # the watcher's clock is behind: 0, not negative


# -- the routes, through HttpApi.handle --------------------------------------------------------

def api(history: History | None = None, catalog: Catalog | None = None) -> HttpApi:
    return HttpApi(catalog, lambda: {"x": {"ok": True}}, Metrics(),
                   views=Views(history.query if history is not None else None))


def test_the_page_and_its_assets_with_a_strict_csp() -> None:
    a = api()
    page = a.handle("/ui/")
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert page.headers["Content-Security-Policy"] == CSP and "'unsafe-inline'" not in CSP
    assert b'<script src="/ui/app.js">' in page.body and b"<script>" not in page.body
    assert b"http" not in page.body.replace(b"http-equiv", b"")  # no external asset
    js = a.handle("/ui/app.js")
    assert js.status == 200 and js.content_type.startswith("text/javascript")
    assert b"innerHTML" not in js.body and b"textContent" in js.body
    assert a.handle("/ui/app.css").content_type.startswith("text/css")
    assert a.handle("/ui").status == 301 and a.handle("/ui").headers["Location"] == "/ui/"
    assert a.handle("/ui/../etc/passwd").status == 404
    assert a.handle(Request("/ui/", headers={"host": "evil.example"})).status == 421


def test_history_endpoint() -> None:
    h = History()
    h.record("web", IID, "n1", "up", Cause("check_passed", "ok"))
    a = api(h)
    ok = a.handle(f"/v1/agent/history?id={IID}")
    assert ok.status == 200
    assert json.loads(ok.body)["instances"][0]["transitions"][0]["cause"] == "check_passed"
    assert json.loads(a.handle("/v1/agent/history?service=web").body)["instances"][0]["id"] == IID
    missing = a.handle("/v1/agent/history?id=n1:000000000000:1")
    assert missing.status == 404 and json.loads(missing.body)["param"] == "id"
    assert a.handle("/v1/agent/history?service=nosuch").status == 404
    assert a.handle("/v1/agent/history?service=Not_A_Label").status == 400
    assert a.handle("/v1/agent/history?bogus=1").status == 400
    assert api().handle("/v1/agent/history").status == 404  # no agent in this process


def test_status_json_carries_history_and_timings() -> None:
    h = History()
    h.record("web", IID, "n1", "up", Cause("check_passed"))
    h.record("web", "n1:0123456789ff:80", "n1", "up", Cause("start"))
    h.depart("n1:0123456789ff:80", Cause("die", "exit code 1"))
    catalog = Catalog()
    record = inst(seen_at=5.0, written_at=5.1)
    catalog.apply(Change("put", ("web", IID), record, 1))
    a = api(h, catalog)
    assert a.metrics is not None
    a.metrics.propagated(record, now=5.3, received=5.2)
    body = json.loads(a.handle("/ui/status.json").body)
    assert [i["id"] for i in body["history"]] == [IID]
    assert body["departed"][0]["transitions"][-1]["output"] == "exit code 1"
    assert body["timings"] == {"web": {IID: a.metrics.stages.of("web", IID)}}
    assert body["timings"]["web"][IID]["received_to_applied"] == pytest.approx(0.1)
    assert body["health"] == {"x": {"ok": True}} and body["catalog"] is True


def test_stages_keep_one_id_apart_in_two_services() -> None:
    stages = Metrics().stages
    stages.observe(inst(written_at=1.0), received=1.5, applied=1.6)
    stages.observe(inst(service="api", written_at=2.0), received=2.25, applied=2.5)
    web, api_ = stages.of("web", IID), stages.of("api", IID)
    assert web is not None and api_ is not None
    assert web["write_to_received"] == pytest.approx(0.5)  # not overwritten by api's
    assert api_["write_to_received"] == pytest.approx(0.25)
    assert stages.of("billing", IID) is None


def test_status_json_timings_keyed_by_service_and_id() -> None:
    """One id under two services (a record written by hand under another service): each row
    of the page gets its own timing, and one never timed gets none, not the other's."""
    catalog = Catalog()
    web, api_, billing = (inst(service=s, written_at=w) for s, w in (
        ("web", 5.0), ("api", 6.0), ("billing", 7.0)))
    for n, record in enumerate((web, api_, billing), 1):
        catalog.apply(Change("put", (record.service, IID), record, n))
    a = api(catalog=catalog)
    assert a.metrics is not None
    a.metrics.propagated(web, now=5.3, received=5.1)
    a.metrics.propagated(api_, now=6.7, received=6.4)  # billing's change not applied yet
    timings = json.loads(a.handle("/ui/status.json").body)["timings"]
    assert set(timings) == {"web", "api"} and set(timings["web"]) == set(timings["api"]) == {IID}
    assert timings["web"][IID]["write_to_received"] == pytest.approx(0.1)
    assert timings["api"][IID]["write_to_received"] == pytest.approx(0.4)
    assert timings["api"][IID]["received_to_applied"] == pytest.approx(0.3)


def test_the_page_looks_instances_up_by_service_and_id() -> None:
    """app.js reads timings as service -> id, and checks and histories by (service, id)."""
    js = api().handle("/ui/app.js").body.decode()
    assert "own(own(timings, inst.service), inst.id)" in js
    assert "instanceKey(inst.service, inst.id)" in js and "byIdMap" not in js


STAT = ("# pxname,svname,qcur,scur,stot,status,weight,h2_detected_conn_protocol_errors,addr,\n"
        "web,s1,0,3,17,UP,100,0,192.0.2.1:80,\n"
        "web,s2,0,0,0,MAINT,1,0,127.0.0.1:1,\n")


def test_show_stat_is_parsed_per_server() -> None:
    from discovery.errors import HAProxyError
    from discovery.watcher.haproxy import parse_stat

    rows = parse_stat(STAT)
    assert rows[("web", "s1")]["scur"] == "3" and rows[("web", "s1")]["status"] == "UP"
    assert rows[("web", "s2")]["addr"] == "127.0.0.1:1"
    with pytest.raises(HAProxyError, match="unexpected"):
        parse_stat("Unknown command.\n")


def test_router_events_keep_reloads_and_errors() -> None:
    from discovery.watcher.router import RouterStats

    stats = RouterStats()
    stats.note("none")
    assert stats.events == []
    stats.reloads += 1
    stats.note("reload")
    stats.haproxy_errors, stats.last_error = 1, "reload failed: boom"
    stats.note("failed")
    stats.note("failed")  # the same failure again: no new event
    assert [(kind, text) for _, kind, text in stats.events] == [
        ("reload", ""), ("error", "reload failed: boom")]
    for _ in range(30):
        stats.reloads += 1
        stats.note("reload")
    assert len(stats.events) == 20
