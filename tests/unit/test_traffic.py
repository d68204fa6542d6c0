"""Traffic quality, pure parts: outlier settings and decisions, zone steering, slot reuse."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from discovery.errors import ConfigError
from discovery.model import Instance, State
from discovery.watcher.config import ServiceConfig, WatcherConfig, watcher_config_from_dict
from discovery.watcher.outlier import OutlierDetector, OutlierSettings
from discovery.watcher.slots import SlotTable
from discovery.watcher.zones import steer


def inst(n: int, zone: str = "", **kw: Any) -> Instance:
    return Instance(service="web", id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=8000 + n, zone=zone, **kw)


# ---- settings ----------------------------------------------------------------------------

def test_outlier_defaults_and_values() -> None:
    cfg = watcher_config_from_dict({"services": {"web": {"port": 1, "outlier": {}}}})
    assert cfg.services["web"].outlier == OutlierSettings()
    assert OutlierSettings().describe() == ("consecutive_errors 5, interval 1s, "
                                            "base_ejection 10s, max_ejected 50%")
    cfg = watcher_config_from_dict({"watcher": {"zone": "eu-1"}, "services": {"web": {
        "port": 1, "zone_min_up": 2, "outlier": {
            "consecutive_errors": 3, "interval": "200ms", "base_ejection": 2,
            "max_ejected": 1}}}})
    web = cfg.services["web"]
    assert (cfg.zone, web.zone_min_up) == ("eu-1", 2)
    assert web.outlier == OutlierSettings(3, 0.2, 2.0, 1, False)
    assert watcher_config_from_dict({"services": {"web": {"port": 1, "outlier": False}}}
                                    ).services["web"].outlier is False  # off, even by zone
    assert ServiceConfig("web", 1, outlier=True).outlier == OutlierSettings()  # type: ignore


@pytest.mark.parametrize(("table", "culprit"), [
    ({"services": {"web": {"port": 1, "outlier": {"consecutive_errors": 0}}}},
     "services.web.outlier.consecutive_errors"),
    ({"services": {"web": {"port": 1, "outlier": {"consecutive_errors": "5"}}}},
     "services.web.outlier.consecutive_errors"),
    ({"services": {"web": {"port": 1, "outlier": {"interval": "fast"}}}},
     "services.web.outlier.interval"),
    ({"services": {"web": {"port": 1, "outlier": {"base_ejection": "2d"}}}},
     "services.web.outlier.base_ejection"),
    ({"services": {"web": {"port": 1, "outlier": {"max_ejected": "150%"}}}},
     "services.web.outlier.max_ejected"),
    ({"services": {"web": {"port": 1, "outlier": {"max_ejected": 1.5}}}},
     "services.web.outlier.max_ejected"),
    ({"services": {"web": {"port": 1, "outlier": {"max_ejectd": 1}}}},
     "services.web.outlier.max_ejectd"),
    ({"services": {"web": {"port": 1, "outlier": "yes"}}}, "services.web.outlier"),
    ({"services": {"web": {"port": 1, "zone_min_up": 0}}}, "services.web.zone_min_up"),
    ({"services": {"web": {"port": 1, "zone_min_up": "1"}}}, "services.web.zone_min_up"),
    ({"watcher": {"zone": "EU 1"}}, "watcher.zone"),
    ({"watcher": {"zone": 3}}, "watcher.zone"),
])
def test_bad_settings_name_the_key(table: dict[str, Any], culprit: str) -> None:
    with pytest.raises(ConfigError) as info:
        watcher_config_from_dict(table)
    assert str(info.value).startswith(culprit + ":"), str(info.value)
    assert "\n" not in str(info.value)


def test_cap() -> None:
    half = OutlierSettings()
    assert [half.cap(n) for n in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    assert OutlierSettings(max_ejected=1, max_ejected_percent=False).cap(0) == 0
    assert OutlierSettings(max_ejected=100).cap(3) == 3


# ---- decisions ---------------------------------------------------------------------------

class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def row(errors: int = 0, ok: int = 0) -> dict[str, str]:
    return {"hrsp_5xx": str(errors), "hrsp_2xx": str(ok), "eresp": "", "econ": "0"}


class Feed:
    """Cumulative counters per slot, as HAProxy keeps them."""

    def __init__(self, n: int) -> None:
        self.counts = {f"s{i}": [0, 0] for i in range(1, n + 1)}
        self.slots = {f"s{i}": f"i{i}" for i in range(1, n + 1)}

    def add(self, slot: str, errors: int = 0, ok: int = 0) -> None:
        self.counts[slot][0] += errors
        self.counts[slot][1] += ok

    def stat(self) -> dict[tuple[str, str], dict[str, str]]:
        return {("web", s): row(*c) for s, c in self.counts.items()}


def step(det: OutlierDetector, cfg: OutlierSettings, feed: Feed, read: bool = True) -> set[str]:
    up = {"web": set(feed.slots.values())}
    return det.observe({"web": cfg}, feed.stat() if read else None, {"web": feed.slots}, up)


def test_consecutive_errors_eject_and_backoff_grows() -> None:
    clock, feed = Clock(), Feed(3)
    det, cfg = OutlierDetector(clock), OutlierSettings(3, 1.0, 10.0)
    assert step(det, cfg, feed) == set()  # first read: the baseline
    feed.add("s1", errors=2)
    feed.add("s2", ok=5)
    assert step(det, cfg, feed) == set()
    feed.add("s1", errors=1)
    assert step(det, cfg, feed) == {"web"}
    assert det.ejected("web") == {"i1"}
    assert "3 errors in a row" in det.status()[0].reason
    clock.now += 9.9
    assert step(det, cfg, feed, read=False) == set()
    clock.now += 0.2
    assert step(det, cfg, feed, read=False) == {"web"} and det.ejected("web") == set()
    step(det, cfg, feed)  # re-based after coming back
    feed.add("s1", errors=3)
    step(det, cfg, feed)
    assert det.status()[0].ejections == 2 and det.status()[0].remaining == pytest.approx(20)
    assert det.stats.ejections == {"web": 2}


def test_a_success_ends_the_run_and_clean_time_forgives() -> None:
    clock, feed = Clock(), Feed(3)
    det, cfg = OutlierDetector(clock), OutlierSettings(3, 1.0, 1.0)
    step(det, cfg, feed)
    for _ in range(5):
        feed.add("s1", errors=2, ok=3)  # errors, but fewer than successes: never a run
        step(det, cfg, feed)
    assert det.ejected("web") == set()
    feed.add("s1", errors=4, ok=1)  # the rate path: more errors than successes in one read
    assert step(det, cfg, feed) == {"web"}
    clock.now += 1.1
    step(det, cfg, feed, read=False)
    step(det, cfg, feed)
    clock.now += 1.1  # clean for as long as it was out
    feed.add("s1", ok=10)
    step(det, cfg, feed)
    feed.add("s1", errors=3)
    step(det, cfg, feed)
    assert det.status()[0].ejections == 1, "the count was forgiven"


def two_bad_of_three() -> tuple[OutlierDetector, OutlierSettings, Feed]:
    """Three instances, i1 and i2 failing: i1 ejected, i2 held by the cap (one of three)."""
    feed = Feed(3)
    det, cfg = OutlierDetector(Clock()), OutlierSettings(2, 1.0, 30.0)
    step(det, cfg, feed)
    feed.add("s1", errors=5)
    feed.add("s2", errors=4)
    step(det, cfg, feed)
    return det, cfg, feed


def test_cap_two_bad_of_three_only_one_out_and_gone_instances_forgotten() -> None:
    det, cfg, feed = two_bad_of_three()
    assert det.ejected("web") == {"i1"}
    assert det.stats.held == {"web": 1}
    del feed.slots["s1"]  # i1 left the catalog: forgotten, room for i2 (cap of 2 up: 1)
    assert step(det, cfg, feed) == {"web"}
    feed.add("s2", errors=2)
    step(det, cfg, feed)
    assert det.ejected("web") == {"i2"}


def test_each_hold_by_the_cap_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    det, cfg, feed = two_bad_of_three()
    feed.add("s2", errors=2)
    step(det, cfg, feed)  # still held: not logged again
    assert caplog.text.count("but not ejected") == 1
    feed.add("s2", ok=20)  # back to health: the hold ends...
    step(det, cfg, feed)
    feed.add("s2", errors=3)  # ...and a new one is logged (it was not: once per ejection)
    step(det, cfg, feed)
    assert det.ejected("web") == {"i1"} and caplog.text.count("but not ejected") == 2


def test_an_instance_that_flaps_out_and_back_stays_ejected_and_keeps_its_count() -> None:
    """An ejected instance whose check flaps (it leaves the up set, then comes back) is still
    out when it returns, and its next ejection is the next one (it came back at ejection 1)."""
    clock, feed = Clock(), Feed(3)
    det, cfg = OutlierDetector(clock), OutlierSettings(3, 1.0, 10.0)
    step(det, cfg, feed)
    feed.add("s1", errors=3)
    step(det, cfg, feed)
    assert det.ejected("web") == {"i1"}
    del feed.slots["s1"]  # deregistered by its check...
    step(det, cfg, feed)
    feed.slots["s1"] = "i1"  # ...and back 2 s later: still out for its 10 s
    clock.now += 2
    assert step(det, cfg, feed) == {"web"} and det.ejected("web") == {"i1"}
    clock.now += 8.1
    step(det, cfg, feed, read=False)
    assert det.ejected("web") == set()
    step(det, cfg, feed)  # re-based after coming back
    feed.add("s1", errors=3)
    step(det, cfg, feed)
    assert det.status()[0].ejections == 2 and det.status()[0].remaining == pytest.approx(20)
    del feed.slots["s1"]  # gone for good: forgotten once it would have been forgiven
    step(det, cfg, feed)
    clock.now += 41
    step(det, cfg, feed)
    assert det._gone == {}


def test_counter_reset_is_a_new_baseline() -> None:
    clock, feed = Clock(), Feed(2)
    det, cfg = OutlierDetector(clock), OutlierSettings(3)
    feed.add("s1", errors=100)
    step(det, cfg, feed)
    feed.counts["s1"] = [1, 0]  # HAProxy reloaded: counters start over
    assert step(det, cfg, feed) == set() and det.ejected("web") == set()


# ---- zones and ejections as the slots see them -------------------------------------------

def test_steer_prefers_the_local_zone_and_spills_over() -> None:
    a, b, c = inst(1, "eu-1"), inst(2, "eu-2"), inst(3)
    both = {i.id: i for i in (a, b, c)}
    out = steer(both, "eu-1", 1, set())
    assert [out[i.id].weight for i in (a, b, c)] == [100, 0, 0]
    assert out[a.id] is a, "unchanged instances are not copied"
    assert [x.weight for x in steer(both, "eu-1", 2, set()).values()] == [100, 100, 100]
    assert steer(both, "", 1, set()) is both
    out = steer(both, "eu-1", 1, {a.id})  # the local one ejected: spill over, it drains
    assert out[a.id].state is State.DRAINING
    assert [out[i.id].weight for i in (b, c)] == [100, 100]
    drained = {a.id: a.with_state(State.DRAINING), b.id: b}
    assert steer(drained, "eu-1", 1, set())[b.id].weight == 100  # draining is not up


def test_zone_min_up_counts_local_instances_that_take_traffic_only() -> None:
    insts = {i.id: i for i in (inst(1, "z1"), inst(2, "z1", weight=0), inst(3, "z2"))}
    assert steer(insts, "z1", 1, set())[inst(3).id].weight == 0
    assert steer(insts, "z1", 2, set())[inst(3).id].weight == 100  # weight 0 serves nothing
    only_idle = {i.id: i for i in (inst(2, "z1", weight=0), inst(3, "z2"))}
    assert steer(only_idle, "z1", 1, set())[inst(3).id].weight == 100  # never every one at 0


# ---- slot reuse --------------------------------------------------------------------------

def test_a_freed_slot_with_sessions_is_not_reused() -> None:
    table = SlotTable(2)
    table.assign({"a": inst(1), "b": inst(2)})
    table.assign({"b": inst(2)})  # s1 freed
    busy = {"s1"}
    changed = table.assign({"b": inst(2), "c": inst(3)}, busy.__contains__)
    assert changed == {} and table.overflow == 1, "s1 still has sessions: c waits"
    busy.clear()
    changed = table.assign({"b": inst(2), "c": inst(3)}, busy.__contains__)
    assert list(changed) == ["s1"] and table.ids() == {"s1": inst(3).id, "s2": inst(2).id}


def test_never_used_slots_go_first_then_the_longest_freed() -> None:
    table = SlotTable(4)
    table.assign({"a": inst(1), "b": inst(2)})
    table.assign({})  # s1, s2 freed (s1 first)
    asked: list[str] = []

    def busy(name: str) -> bool:
        asked.append(name)
        return False

    table.assign({"c": inst(3), "d": inst(4)}, busy)
    assert table.ids() == {"s3": inst(3).id, "s4": inst(4).id} and asked == []
    table.assign({"c": inst(3), "d": inst(4), "e": inst(5)}, busy)
    assert table.ids()["s1"] == inst(5).id and asked == ["s1"]


def test_watcher_config_without_zone_is_unchanged() -> None:
    assert WatcherConfig().zone == ""


def test_status_read_by_a_scrape_while_the_watcher_ejects() -> None:
    """``status()`` runs on an HTTP thread (``/metrics``, ``/v1/health``) while the watcher's
    tick ejects and re-admits: it iterated the live dict ("dictionary changed size during
    iteration" in about one scrape in a hundred under churn, a 500)."""
    from discovery.watcher import outlier

    detector = OutlierDetector()
    stop = threading.Event()
    churned, failed = [0], []

    def churn() -> None:  # instances (and services: the outer dict too) come and go
        i = 0
        try:
            while not stop.is_set():
                tracked = outlier._Tracked()
                tracked.until = 1.0
                detector._track((f"s{i % 7}", f"i{i % 500}"), tracked)
                gone = (f"s{(i + 3) % 7}", f"i{(i + 250) % 500}")
                if gone[1] in detector._by_service.get(gone[0], {}):
                    detector._untrack(gone)
                i += 1
                churned[0] = i
        except Exception as exc:  # the churn itself must run: a failure here fails the test
            failed.append(exc)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    calls, until = 0, time.monotonic() + 1.5
    try:
        while time.monotonic() < until:  # (a bounded window of scrapes under churn)
            detector.status()
            calls += 1
    finally:
        stop.set()
        thread.join(5)
    assert calls > 100 and churned[0] > 100 and failed == []
