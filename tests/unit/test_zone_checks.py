"""Zone-aware routing and HAProxy's checks (watcher/stat_reads.CheckedDown, zones.steer): a
local instance the registry calls up but HAProxy's checks hold down is not the local zone's."""

from __future__ import annotations

import pytest

from discovery.errors import ConfigError
from discovery.model import Instance
from discovery.watcher.config import watcher_config_from_dict
from discovery.watcher.outlier import OutlierDetector, OutlierSettings
from discovery.watcher.stat_reads import CHECK_READ, CheckedDown
from discovery.watcher.zones import steer


def inst(n: int, zone: str) -> Instance:
    return Instance(service="web", id=f"h{n}:{n:012x}:80", node=f"h{n}", address="192.0.2.1",
                    port=8000 + n, zone=zone)


NEAR, FAR = inst(1, "z1"), inst(2, "z2")
SLOTS = {"web": {"s1": NEAR.id, "s2": FAR.id}}


def stat(near: str, far: str = "UP") -> dict[tuple[str, str], dict[str, str]]:
    return {("web", "s1"): {"status": near}, ("web", "s2"): {"status": far}}


def test_the_local_zone_checked_down_spills_over_and_comes_back() -> None:
    clock = [100.0]
    checks = CheckedDown(clock=lambda: clock[0])
    both = {NEAR.id: NEAR, FAR.id: FAR}
    assert steer(both, "z1", 1, set(), checks.down.get("web", set()))[FAR.id].weight == 0
    assert checks.due(["web"]) == 0.0  # read at once
    assert checks.observe(["web"], stat("DOWN"), SLOTS) == {"web"}
    assert checks.due(["web"]) == 100.0 + CHECK_READ
    routed = steer(both, "z1", 1, set(), checks.down["web"])
    assert routed[FAR.id].weight == FAR.weight  # spilled over: z2 takes the traffic
    assert routed[NEAR.id] is NEAR  # not drained: HAProxy goes on checking it
    assert checks.observe(["web"], stat("DOWN 1/2"), SLOTS) == set()  # rising: still down
    assert checks.observe(["web"], stat("UP"), SLOTS) == {"web"}
    assert steer(both, "z1", 1, set(), checks.down.get("web", set()))[FAR.id].weight == 0


def test_only_a_down_status_counts_and_a_service_no_longer_checked_is_forgotten() -> None:
    checks = CheckedDown()
    for status in ("UP", "UP 1/3", "no check", "MAINT", "DRAIN", "NOLB", ""):
        assert checks.observe(["web"], stat(status), SLOTS) == set(), status
    assert checks.observe(["web"], stat("DOWN"), SLOTS) == {"web"}
    assert checks.observe([], stat("DOWN"), SLOTS) == {"web"} and not checks.down
    checks.observe(["web"], stat("DOWN"), SLOTS)
    assert checks.due([]) is None and not checks.down  # the setting went


def test_a_slow_reading_of_every_backend_is_read_less_often() -> None:
    """``show stat`` of every backend: ~0.5 s at 1,000 services, under the router's lock; read
    every second, that was half the time. Now at most a tenth of it."""
    clock = [100.0]
    checks = CheckedDown(clock=lambda: clock[0])
    checks.observe(["web"], stat("UP"), SLOTS, took=0.01)
    assert checks.next_read == 100.0 + CHECK_READ
    checks.observe(["web"], stat("UP"), SLOTS, took=0.5)
    assert checks.next_read == 100.0 + 5.0
    checks.failed()  # (a read that timed out, 2 s: not 20 s without a reading)
    assert checks.next_read == 100.0 + CHECK_READ
    checks.failed()  # still failing: the wait doubles (not the lock 2/3 of the time)
    assert checks.next_read == 100.0 + 2 * CHECK_READ
    checks.observe(["web"], stat("UP"), SLOTS)
    checks.failed()  # (a success in between: from the first wait again)
    assert checks.next_read == 100.0 + CHECK_READ


@pytest.mark.parametrize(("zone", "table", "ejects"), [
    ("z1", {}, True),  # routed by zone, no check: on, with the defaults
    ("z1", {"check": True}, False),  # HAProxy's checks tell (CheckedDown)
    ("z1", {"outlier": False}, False),  # asked off
    ("z1", {"mode": "tcp"}, False),  # no response counters: a success never ends a run
    ("", {}, False),  # no zone: off, as before
    ("", {"outlier": {"consecutive_errors": 3}}, True),  # asked for
])
def test_a_service_routed_by_zone_without_checks_ejects_outliers_by_default(
        zone: str, table: dict[str, object], ejects: bool) -> None:
    """A local instance nothing answers on (one record: every host of the zone reads it)
    held the other zones at weight 0: every host of the zone answered 503 for the service,
    for as long as the record stayed. Now its connection errors (``econ``) eject it, and the
    zone spills over."""
    cfg = watcher_config_from_dict({"watcher": {"zone": zone} if zone else {},
                                    "services": {"web": {"port": 1, **table}}})
    settings = cfg.services["web"].outlier_in(cfg.zone)
    assert (settings is not None) == ejects
    if settings is None or table:
        return
    detector, both = OutlierDetector(clock=lambda: 100.0), {NEAR.id: NEAR, FAR.id: FAR}
    up = {"web": {NEAR.id, FAR.id}}
    for econ in range(settings.consecutive_errors + 1):  # a read a second, each request
        detector.observe({"web": settings}, econs(econ), SLOTS, up)
    ejected = detector.ejected("web")
    assert ejected == {NEAR.id}
    routed = steer(both, "z1", 1, ejected)
    assert routed[FAR.id].weight == FAR.weight  # spilled over: z2 takes the traffic


def econs(count: int) -> dict[tuple[str, str], dict[str, str]]:
    """``show stat`` rows: the local instance refuses every connection, the far one serves."""
    return {("web", "s1"): {"econ": str(count)}, ("web", "s2"): {"hrsp_2xx": "0"}}


def test_a_slow_reading_of_the_counters_is_read_less_often() -> None:
    """As the checks' reading: ``show stat`` of every backend (~0.5 s at 1,000 services,
    under the router's lock) once a second was half the time, now that every service routed
    by zone reads the counters. At most a tenth of it."""
    detector, up = OutlierDetector(clock=lambda: 100.0), {"web": {NEAR.id, FAR.id}}
    settings = {"web": OutlierSettings()}
    detector.observe(settings, econs(0), SLOTS, up, took=0.01)
    assert detector.next_read == 100.0 + settings["web"].interval
    detector.observe(settings, econs(0), SLOTS, up, took=0.5)
    assert detector.next_read == 100.0 + 5.0


def test_ejections_end_once_no_setting_asks_for_them() -> None:
    """A SIGHUP that takes ``[watcher] zone`` away (and with it the default setting) left an
    ejected instance drained for good: nothing asked for the counters, so nothing ended it."""
    clock = [100.0]
    detector, up = OutlierDetector(clock=lambda: clock[0]), {"web": {NEAR.id, FAR.id}}
    settings = {"web": OutlierSettings(consecutive_errors=1)}
    for econ in range(3):
        detector.observe(settings, econs(econ), SLOTS, up)
    assert detector.ejected("web") == {NEAR.id}
    assert detector.due({}) == 0.0  # (before: None, never due)
    assert detector.observe({}, None, {}, {}) == {"web"} and not detector.ejected("web")
    assert detector.due({}) is None


def test_local_instances_the_cap_keeps_in_do_not_hold_the_zone() -> None:
    """Two bad local instances and one good far one: ``max_ejected`` (50 %: one of three)
    ejects one; the other, failing as much, must not count as the local zone's up, or it
    holds the far zone at weight 0 and takes every request (a new zone whose hosts were all
    started with one wrong ``--address``)."""
    near2 = inst(3, "z1")
    slots = {"web": {"s1": NEAR.id, "s3": near2.id, "s2": FAR.id}}
    up = {"web": {NEAR.id, near2.id, FAR.id}}
    detector, settings = OutlierDetector(clock=lambda: 100.0), {"web": OutlierSettings()}
    for econ in range(settings["web"].consecutive_errors + 1):
        rows = {**econs(econ), ("web", "s3"): {"econ": str(econ)}}
        detector.observe(settings, rows, slots, up)
    ejected, held = detector.ejected("web"), detector.held_back("web")
    assert len(ejected) == 1 and held == {NEAR.id, near2.id} - ejected
    routed = steer({NEAR.id: NEAR, near2.id: near2, FAR.id: FAR}, "z1", 1, ejected, held)
    assert routed[FAR.id].weight == FAR.weight  # spilled over


def test_an_outlier_setting_on_a_tcp_service_is_refused_naming_it() -> None:
    """HAProxy counts no responses in TCP mode: no read would end a run, so rare connection
    errors added up until a healthy instance was ejected (one refused a minute out of 100 a
    second: ejected after 5). Refused, naming the key; ``check = true`` is the way there."""
    with pytest.raises(ConfigError, match=r'services\.db\.outlier: needs mode = "http"'):
        watcher_config_from_dict({"services": {"db": {"port": 1, "mode": "tcp",
                                                      "outlier": True}}})
    tcp = watcher_config_from_dict({"services": {"db": {"port": 1, "mode": "tcp",
                                                        "outlier": False}}})
    assert tcp.services["db"].outlier_in("z1") is None


def test_what_the_cap_held_is_forgotten_once_no_setting_asks() -> None:
    """``/v1/health``'s ``held_by_max_ejected`` and the metric stayed stuck after a SIGHUP
    took the setting (or the zone) away."""
    detector, up = OutlierDetector(clock=lambda: 100.0), {"web": {NEAR.id, FAR.id}}
    settings = {"web": OutlierSettings(consecutive_errors=1, max_ejected=0,
                                       max_ejected_percent=False)}
    for econ in range(3):
        detector.observe(settings, econs(econ), SLOTS, up)
    assert detector.stats.held == {"web": 1} and detector.held_back("web") == {NEAR.id}
    detector.observe({}, None, {}, {})
    assert detector.stats.held == {} and detector.held_back("web") == set()
