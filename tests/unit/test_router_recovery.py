"""The router after what goes wrong between it and HAProxy: no usable slot, a runtime-API
call or a reload that fails, a full disk, a ``show stat`` that fails. A fake HAProxy control;
the real ``haproxy -c`` checks what is rendered."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from discovery.errors import HAProxyError, RenderError
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot
from discovery.watcher import router as router_module
from discovery.watcher.config import ServiceConfig, WatcherConfig
from discovery.watcher.outlier import OutlierSettings
from discovery.watcher.render import Renderer, RuntimePaths
from discovery.watcher.router import Router
from tests.harness.util import require_tool

WEB = ServiceConfig(name="web", port=18000)


class Runtime:
    def __init__(self) -> None:
        self.sent: list[dict[str, list[tuple[str, str]]]] = []
        self.busy: set[str] = set()
        self.fail_apply = self.fail_stat = False
        self.stats = 0
        self.errors: dict[str, int] = {}  # slot -> its 5xx so far

    def stat(self, backend: str | None = None) -> dict[tuple[str, str], dict[str, str]]:
        self.stats += 1
        if self.fail_stat:
            raise HAProxyError("cannot reach admin.sock")
        return {("web", f"s{n}"): {"scur": "3" if f"s{n}" in self.busy else "0",
                                   "hrsp_5xx": str(self.errors.get(f"s{n}", 0))}
                for n in range(1, 33)}

    def apply_slots(self, changes: dict[str, list[Any]]) -> None:
        if self.fail_apply:
            raise HAProxyError("admin.sock: connection failed after 0 of 3 commands: timed out")
        self.sent.append({k: [(s.name, s.instance_id) for s in v] for k, v in changes.items()})


class Control:
    def __init__(self) -> None:
        self.runtime = Runtime()
        self.reloads = 0
        self.fail_reload = False

    def reload(self) -> None:
        if self.fail_reload:
            raise HAProxyError("reload failed: the old worker keeps serving")
        self.reloads += 1


def inst(n: int) -> Instance:
    return Instance(service="web", id=f"h:{n:012x}:80", node="h", address="127.0.0.1",
                    port=8000 + n)


def setup(tmp_path: Path, n: int, config: WatcherConfig | None = None
          ) -> tuple[Router, Control, Catalog]:
    require_tool("haproxy", "haproxy")
    control = Control()
    router = Router(config or WatcherConfig(services={"web": WEB}), tmp_path / "haproxy.cfg",
                    RuntimePaths(str(tmp_path / "admin.sock")), control)  # type: ignore[arg-type]
    catalog = Catalog()
    catalog.load(Snapshot({inst(i).key: inst(i) for i in range(1, n + 1)}, revision=1))
    assert router.sync(catalog) == "reload"
    return router, control, catalog


def put(catalog: Catalog, n: int) -> None:
    catalog.apply(Change("put", inst(n).key, inst(n), revision=100 + n))


def test_a_replacement_with_no_usable_slot_is_placed_with_a_reload(tmp_path: Path) -> None:
    router, control, catalog = setup(tmp_path, 5)
    for n in (6, 7, 8):  # grown to 8 instances in the 8 slots: runtime only
        put(catalog, n)
        assert router.sync(catalog, {"web"}) == "runtime"
    assert router.tables["web"].size == 8
    catalog.apply(Change("delete", inst(1).key, revision=50))  # a rolling deploy: 1 -> 9
    put(catalog, 9)
    # within reload_min_interval (1 s) of the last reload: it waits, tick places it (churn
    # onto slots that keep their sessions made every sync a reload, several a second)
    assert router.sync(catalog, {"web"}) == "runtime" and control.reloads == 1
    assert inst(9).id not in router.tables["web"].ids().values()
    due = router.next_due()
    assert due is not None and due <= time.monotonic() + 1.0
    deadline = time.monotonic() + 3.0
    while inst(9).id not in router.tables["web"].ids().values():
        assert time.monotonic() < deadline, "not placed within the interval"
        router.tick(catalog)
        time.sleep(0.02)
    # by then slot 1 is no longer "freed in this very call": HAProxy says it has no sessions,
    # so the runtime API placed it, no reload at all (busy: the reload below)
    assert control.reloads == 1 and router.tables["web"].size == 8
    catalog.apply(Change("delete", inst(2).key, revision=51))
    put(catalog, 10)
    control.runtime.busy = {"s2"}
    router.stats.last_reload = time.time() - 2.0  # the interval passed: a reload at once
    assert router.sync(catalog, {"web"}) == "reload" and control.reloads == 2
    assert inst(10).id in router.tables["web"].ids().values()
    assert router.sync(catalog, {"web"}) == "none"  # placed: nothing more to do


def test_a_failed_runtime_call_is_sent_again(tmp_path: Path) -> None:
    router, control, catalog = setup(tmp_path, 1)
    control.runtime.fail_apply = True
    put(catalog, 2)
    assert router.sync(catalog, {"web"}) == "runtime"
    assert control.runtime.sent == [] and router.next_due() is not None
    control.runtime.fail_apply = False
    assert router.sync(catalog, set()) == "runtime"  # any later sync sends it along
    assert control.runtime.sent == [{"web": [("s2", inst(2).id)]}]
    assert router.next_due() is None  # nothing left to send
    control.runtime.fail_apply = True
    put(catalog, 3)
    router.sync(catalog, {"web"})
    control.runtime.fail_apply = False
    deadline = time.monotonic() + 5  # with no sync, the watcher's tick sends it when due
    while control.runtime.sent[-1] != {"web": [("s3", inst(3).id)]}:
        assert time.monotonic() < deadline, control.runtime.sent
        router.tick(catalog)
        time.sleep(0.05)
    assert router.next_due() is None


def test_a_failed_reload_is_tried_again_even_if_the_file_is_the_same(tmp_path: Path) -> None:
    router, control, catalog = setup(tmp_path, 1)
    more = WatcherConfig(services={"web": WEB, "api": ServiceConfig(name="api", port=18001)})
    control.fail_reload = True  # e.g. the new port is taken: haproxy -c cannot see that
    router.set_config(more, Renderer(None))
    assert router.sync(catalog) == "failed" and set(router.tables) == {"web"}
    control.fail_reload = False
    router.set_config(more, Renderer(None))  # SIGHUP again, the same file
    assert router.sync(catalog) == "reload" and control.reloads == 2
    assert set(router.tables) == {"web", "api"} and not router.structure_changed()


def test_a_failed_reload_is_tried_again_when_due_with_nothing_changing(tmp_path: Path) -> None:
    router, control, catalog = setup(tmp_path, 1)
    more = WatcherConfig(services={"web": WEB, "api": ServiceConfig(name="api", port=18001)})
    control.fail_reload = True
    router.set_config(more, Renderer(None))
    assert router.sync(catalog) == "failed"
    failed = time.monotonic()
    assert router.sync(catalog) == "failed"
    assert control.reloads == 1  # the same inputs again: not hammered...
    due = router.next_due()
    assert due is not None and 0.5 <= due - failed <= 1.0  # ...but tried again in 1 s,
    router.tick(catalog)
    assert control.reloads == 1  # (not before)
    while time.monotonic() < due:
        time.sleep(0.02)
    router.tick(catalog)  # still failing: the wait doubles
    again = router.next_due()
    assert again is not None and 1.5 <= again - time.monotonic() <= 2.0
    control.fail_reload = False
    while time.monotonic() < again:
        time.sleep(0.02)
    router.tick(catalog)  # HAProxy answers again: reloaded with no SIGHUP nor change
    assert control.reloads == 2 and set(router.tables) == {"web", "api"}
    assert router.next_due() is None


def test_no_busy_loop_while_haproxy_cannot_start(tmp_path: Path) -> None:
    """Runtime changes failed while HAProxy's master was gone; then its start fails too: what
    was unsent is left to the start (its file carries every slot), never due in the past."""
    from unittest.mock import MagicMock

    from discovery.watcher.supervisor import HAProxySupervisor

    control = MagicMock(spec=HAProxySupervisor)
    control.running, control.handed_over = True, None
    control.nothing_here.return_value = False
    control.runtime = MagicMock()
    control.runtime.apply_slots.side_effect = HAProxyError("admin.sock: connection refused")
    router = Router(WatcherConfig(services={"web": WEB}), tmp_path / "haproxy.cfg",
                    RuntimePaths(str(tmp_path / "admin.sock")), control)
    catalog = Catalog()
    catalog.load(Snapshot({inst(1).key: inst(1)}, revision=1))
    assert router.sync(catalog) == "reload"
    put(catalog, 2)
    router.sync(catalog, {"web"})  # the runtime call fails: sent again in 1 s
    control.running = False  # the master is gone, and a new one cannot start
    control.start.side_effect = HAProxyError("HAProxy exited with code 1 at start")
    router.set_config(WatcherConfig(services={"web": WEB, "api": ServiceConfig(
        name="api", port=18001)}), Renderer(None))
    assert router.sync(catalog) == "failed"
    time.sleep(1.1)  # past the runtime call's retry
    for _ in range(3):
        router.tick(catalog)
        due = router.next_due()
        assert due is not None and due > time.monotonic(), "due in the past: a busy loop"


def test_a_config_haproxy_refuses_is_not_tried_again(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    router, _, catalog = setup(tmp_path, 1)
    router.set_config(WatcherConfig(services={"web": WEB, "api": ServiceConfig(
        name="api", port=18001)}), Renderer(None))

    def refuse(binary: str, path: Path) -> None:
        raise RenderError(f"{path}: HAProxy rejects the config: [ALERT] ...")

    monkeypatch.setattr(router_module, "validate_config", refuse)
    assert router.sync(catalog) == "failed"
    assert router.next_due() is None  # the same file would be refused again


def test_a_full_disk_keeps_the_last_good_config(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    router, control, catalog = setup(tmp_path, 1)

    def full(text: str, dest: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(router_module, "stage", full)
    router.stats.last_reload -= 60  # (a reload within reload_min_interval of the last waits)
    for n in range(2, 10):  # 9 instances: more than the 8 slots, a reload
        put(catalog, n)
    assert router.sync(catalog, {"web"}) == "failed"
    assert "No space left" in router.stats.last_error and control.reloads == 1
    assert router._again.due  # tried again (a full disk may pass): it was not, till the
    monkeypatch.undo()  # next size
    router._again.due = time.monotonic() - 1  # (its time come)
    router.tick(catalog)
    assert control.reloads == 2 and len(router.tables["web"].ids()) == 9


def test_slots_outgrown_within_the_interval_reload_once_it_has_passed(tmp_path: Path) -> None:
    """A service outgrowing its slots reloads once ``reload_min_interval`` has passed since the
    last reload (its tick), what fits placed meanwhile: a burst of 1 -> 300 instances made a
    reload at 9, 17, 33, 65, 129 and 257 within 0.1 s."""
    config = WatcherConfig(services={"web": WEB}, reload_min_interval=0.3)
    router, control, catalog = setup(tmp_path, 1, config)
    for n in range(2, 40):
        put(catalog, n)
        router.sync(catalog, {"web"})
    assert control.reloads == 1 and len(router.tables["web"].ids()) == 8  # what fits
    due = router.next_due()
    assert due is not None and due <= time.monotonic() + 0.3
    while control.reloads == 1:
        assert time.monotonic() < due + 5
        router.tick(catalog)
        time.sleep(0.01)
    assert control.reloads == 2 and len(router.tables["web"].ids()) == 39


def test_a_failing_show_stat_waits_for_the_next_interval(tmp_path: Path) -> None:
    config = WatcherConfig(services={"web": ServiceConfig(name="web", port=18000,
                                                          outlier=OutlierSettings())})
    router, control, catalog = setup(tmp_path, 1, config)
    control.runtime.fail_stat = True
    for _ in range(100):
        router.tick(catalog)
    due = router.next_due()
    assert control.runtime.stats == 1 and due is not None and due > time.monotonic()


def test_an_ejection_never_reuses_a_freed_slot_with_sessions(tmp_path: Path) -> None:
    """An ejection (the watcher's tick) applied while a membership change waits for its sync:
    the change's new instance must not take the slot whose old instance still has sessions."""
    config = WatcherConfig(services={"web": ServiceConfig(
        name="web", port=18000, outlier=OutlierSettings(1, 0.05, 30.0))})
    router, control, catalog = setup(tmp_path, 8, config)
    size = router.tables["web"].size
    for n in range(9, size + 1):  # every slot used: none never used is left
        put(catalog, n)
    assert router.sync(catalog, {"web"}) in ("runtime", "none")
    router.tick(catalog)  # the counters' baseline
    new = size + 1
    catalog.apply(Change("delete", inst(1).key, revision=50))  # a rolling replacement 1 -> new
    put(catalog, new)  # (its sync not yet run)
    control.runtime.busy = {"s1"}  # instance 1's slot still serves its sessions
    control.runtime.errors["s2"] = 1
    deadline = time.monotonic() + 5
    while router.outliers.ejected("web") != {inst(2).id}:
        assert time.monotonic() < deadline, "instance 2 was not ejected"
        time.sleep(0.06)
        router.tick(catalog)
    sent = [slot for batch in control.runtime.sent for slot in batch.get("web", [])]
    assert ("s1", inst(new).id) not in sent, sent


def test_a_reload_for_no_usable_slot_is_tried_once_for_the_same_inputs(tmp_path: Path) -> None:
    router, control, catalog = setup(tmp_path, 5, WatcherConfig(services={"web": WEB},
                                                                reload_min_interval=0))
    for n in (6, 7, 8):
        put(catalog, n)
        router.sync(catalog, {"web"})
    control.fail_reload = True
    catalog.apply(Change("delete", inst(1).key, revision=50))
    put(catalog, 9)
    assert router.sync(catalog, {"web"}) == "failed"
    for _ in range(3):
        router.sync(catalog, {"web"})
    assert router.stats.haproxy_errors == 1  # not once a sync


def test_a_service_past_the_most_slots_routes_what_fits_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A runaway writer's service (here past a most of 8 slots): the backend stops growing,
    what fits is routed, one error says how many are not (again only when that changes), and
    no sync tries a reload for it (each would render and check the whole config in vain)."""
    from discovery.watcher import slots as slots_module
    monkeypatch.setattr(slots_module, "MAX_SLOTS", 8)
    monkeypatch.setattr(router_module, "MAX_SLOTS", 8)
    router, control, catalog = setup(tmp_path, 6)
    for n in range(7, 13):  # 12 instances for 8 slots
        put(catalog, n)
    assert router.sync(catalog, {"web"}) == "runtime"
    assert router.tables["web"].size == 8 and len(router.tables["web"].ids()) == 8
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["web has 12 instances, more than the 8 slots a backend may have: 4 of "
                      "them not routed"]
    assert router.sync(catalog) in ("none", "runtime") and control.reloads == 1
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # said once


def test_an_adopted_haproxy_whose_catch_up_reload_fails_is_watched_and_reloaded_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new watcher finds an HAProxy left running on another config and its reload fails (a
    listener's port taken): the next try reloads it again (it took the file for loaded, and
    never reloaded), and a monitor watches it all the while (none was started: a later crash
    of the master went unrestarted). The "master" here is this test's own process: it is left
    running (``leave``), never signalled."""
    from discovery.watcher import adopt
    from discovery.watcher import supervisor as supervisor_module
    from discovery.watcher.supervisor import HAProxySupervisor

    me = os.getpid()
    for module in (router_module, supervisor_module):
        monkeypatch.setattr(module, "validate_config", lambda *a, **k: None)
    monkeypatch.setattr(adopt, "survey", lambda *a: adopt.Found(me, (me,)))
    monkeypatch.setattr(adopt, "exe", lambda pid: "/x/haproxy")
    monkeypatch.setattr(adopt, "binary_path", lambda binary: "/x/haproxy")
    (tmp_path / adopt.LOADED_FILE).write_text("another config's digest\n")
    sup = HAProxySupervisor(tmp_path / "haproxy.cfg", tmp_path)
    reloads: list[float] = []

    def refused(timeout: float = 15.0) -> None:
        reloads.append(time.monotonic())
        raise HAProxyError("reload: no new worker within 15s")

    monkeypatch.setattr(sup.master, "reload", refused)
    monkeypatch.setattr(sup.runtime, "apply_slots", lambda changes: None)
    router = Router(WatcherConfig(services={"web": WEB}), tmp_path / "haproxy.cfg",
                    RuntimePaths(str(tmp_path / "admin.sock")), sup)
    catalog = Catalog()
    catalog.load(Snapshot({inst(1).key: inst(1)}, revision=1))
    try:
        assert router.sync(catalog) == "failed" and len(reloads) == 1
        assert sup.running and sup._monitor is not None and sup._monitor.is_alive()
        router._again.due = time.monotonic() - 1  # (its time come)
        router.tick(catalog)
        assert len(reloads) == 2 and router.structure_changed()  # not taken for loaded
    finally:
        sup.leave()
        if sup._monitor is not None:
            sup._monitor.join(5)


def test_a_sigusr2_during_haproxys_start_still_leaves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR2 (leave) that came while HAProxy was started or adopted: start() forgot it, and
    the exit then stopped the HAProxy the next watcher was to adopt."""
    from discovery.watcher import adopt
    from discovery.watcher.supervisor import HAProxySupervisor

    monkeypatch.setattr(adopt, "survey", lambda *a: None)
    sup = HAProxySupervisor(tmp_path / "haproxy.cfg", tmp_path)
    monkeypatch.setattr(sup, "_spawn", lambda found, checked=True: None)
    sup.leave()  # (its handler's thread ran first)
    sup.start(validated=True)
    assert sup._left


def test_a_reload_shrinks_a_backend_left_four_times_too_big(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 instances, then 10: at the next reload (any: here a service added) once that has
    lasted SHRINK_AFTER, the backend has the slots its most instances since need, not the 512
    a burst (or a runaway writer: 65,536, ~270 MB of HAProxy on every host) left."""
    monkeypatch.setattr(router_module, "SHRINK_AFTER", 0.0)
    router, control, catalog = setup(tmp_path, 300)
    assert router.tables["web"].size == 512
    reloads = control.reloads
    for n in range(11, 301):
        catalog.apply(Change("delete", inst(n).key, revision=1000 + n))
    router.sync(catalog, {"web"})
    assert router.tables["web"].size == 512 and control.reloads == reloads  # not for that
    api = ServiceConfig(name="api", port=18001)
    router.set_config(WatcherConfig(services={"web": WEB, "api": api}))
    assert router.sync(catalog) == "reload"
    assert router.tables["web"].size == 16 and len(router.tables["web"].ids()) == 10
    for n in range(11, 41):
        put(catalog, n)
    router.set_config(WatcherConfig(services={"web": WEB}))
    assert router.sync(catalog) == "reload"
    assert router.tables["web"].size == 64  # 40 need 64: grown, as before


def test_bursts_in_turn_do_not_shrink_and_grow_at_each_reload(tmp_path: Path) -> None:
    """Two services bursting in turn (10 -> 300 -> 10): shrunk at each other's growth
    reload, each grew again: 10 rounds took 11 reloads. Within SHRINK_AFTER, no shrink."""
    api = ServiceConfig(name="api", port=18001)
    config = WatcherConfig(services={"web": WEB, "api": api}, reload_min_interval=0.0)
    router, control, catalog = setup(tmp_path, 10, config)
    reloads = control.reloads

    def burst(service: str, up: bool) -> None:
        for n in range(11, 301):
            i = replace(inst(n), service=service, id=f"{service}:{n:012x}:80")
            catalog.apply(Change("put", i.key, i, revision=2000 + n) if up
                          else Change("delete", i.key, revision=3000 + n))
        router.sync(catalog)

    for _ in range(5):
        for service in ("web", "api"):
            burst(service, True)
            burst(service, False)
    assert control.reloads - reloads <= 2  # each grew once, and stayed
