"""The last catalog on disk (``discovery/watcher/remember.py``): a watcher restarted while the
registry is wiped holds what it routed before, as one that ran through the wipe does."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot
from discovery.registry.url import RegistryURL
from discovery.watcher import remember as remember_mod
from discovery.watcher.core import Watcher
from discovery.watcher.guard import GuardSettings
from discovery.watcher.remember import Remember, recall, source_of
from tests.unit.test_watcher_loop import _Registry


def _inst(service: str, n: int, node: str, state: State = State.UP) -> Instance:
    return Instance(service=service, id=f"{node}:{n:012d}:80", node=node, address="192.0.2.1",
                    port=8000 + n, registered_at=1.0, state=state)


#: 8 instances of 4 services on 4 nodes, each service on two nodes
FLEET = [_inst(f"svc{s}", s, f"node{(s + k) % 4}") for s in range(4) for k in range(2)]


URL = RegistryURL.parse("etcd://127.0.0.1:2379/unit")
SOURCE = source_of(URL)


class _Read(_Registry):
    url = URL  # type: ignore[assignment]

    def __init__(self, instances: list[Instance]) -> None:
        super().__init__()
        self.instances = instances

    def snapshot(self, services: object = None) -> Snapshot:
        return Snapshot({i.key: i for i in self.instances}, 7)


def _kept(path: Path, instances: list[Instance], source: str = SOURCE) -> None:
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in instances}, 5))
    assert Remember(path, catalog, source=source).write()


def _started(registry: _Registry, path: Path | None) -> tuple[Watcher, threading.Thread]:
    watcher = Watcher(registry, None, remember=path)  # type: ignore[arg-type]
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    assert watcher.wait_ready(10)
    return watcher, thread


def _seeds_nothing(registry: _Registry, path: Path) -> None:
    """A watcher started on ``registry`` (wiped: empty) with ``path`` holds nothing."""
    watcher, thread = _started(registry, path)
    try:
        assert watcher.catalog.size() == 0 and watcher.guard.held() == []
    finally:
        _stopped(watcher, thread)


def _stopped(watcher: Watcher, thread: threading.Thread) -> None:
    watcher.stop()
    thread.join(5)
    watcher.close()
    assert not thread.is_alive()


def test_a_watcher_started_during_a_wipe_holds_what_it_routed_before(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    watcher, thread = _started(_Read([]), path)  # the registry wiped: nothing in it
    try:
        assert watcher.catalog.size() == len(FLEET)
        assert watcher.catalog.loaded
        assert watcher.guard.status.engaged
        deadline = time.monotonic() + 5  # held once settled (0.2 s)
        while len(watcher.guard.held()) < len(FLEET) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(watcher.guard.held()) == len(FLEET)
        assert watcher.catalog.size() == len(FLEET)
    finally:
        _stopped(watcher, thread)


def test_without_the_file_a_watcher_started_during_a_wipe_has_nothing(tmp_path: Path) -> None:
    watcher, thread = _started(_Read([]), tmp_path / "catalog.last.json")  # (a control)
    try:
        assert watcher.catalog.size() == 0 and watcher.catalog.loaded
        assert watcher.guard.held() == []
    finally:
        _stopped(watcher, thread)


def test_a_first_read_like_the_file_holds_nothing_and_takes_the_registrys_values(
        tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    now = [i if i.service != "svc0" else replace(i, weight=7) for i in FLEET]
    watcher, thread = _started(_Read(now), path)
    try:
        assert watcher.guard.held() == []
        assert sorted(i.weight for i in watcher.catalog.instances("svc0")) == [7, 7]
        assert watcher.catalog.size() == len(FLEET)
    finally:
        _stopped(watcher, thread)


def test_a_host_gone_while_the_watcher_was_away_is_removed_not_held(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    now = [i for i in FLEET if i.node != "node0"]  # 2 of 8: each service keeps another
    watcher, thread = _started(_Read(now), path)
    try:
        assert watcher.guard.held() == []
        assert {i.key for i in watcher.catalog.instances()} == {i.key for i in now}
    finally:
        _stopped(watcher, thread)


def test_a_stopped_watcher_leaves_its_up_instances_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    draining = _inst("svc9", 9, "node1", State.DRAINING)
    watcher, thread = _started(_Read([*FLEET, draining]), path)
    _stopped(watcher, thread)  # (its sync asked for a write within 30 s: close writes now)
    assert {i.key for i in recall(path, SOURCE).instances} == {i.key for i in FLEET}
    assert {i.key for i in recall(path, SOURCE, lambda s: s == "svc1").instances} == {
        i.key for i in FLEET if i.service == "svc1"}


def test_writes_come_at_most_every_so_often_and_close_writes_what_is_left(
        tmp_path: Path) -> None:
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in FLEET[:2]}, 1))
    keeper = Remember(tmp_path / "f.json", catalog, every=0.5)
    writes: list[float] = []
    write = keeper.write

    def counted() -> None:
        writes.append(time.monotonic())
        write()

    keeper.write = counted  # type: ignore[method-assign]
    t0 = time.monotonic()
    for _ in range(20):  # 20 changes within ~1 s
        keeper.changed()
        time.sleep(0.05)
    catalog.load(Snapshot({i.key: i for i in FLEET}, 2))
    keeper.changed()
    keeper.close()
    gaps = [b - a for a, b in pairwise(writes)]
    assert 2 <= len(writes) <= 4 and all(g >= 0.49 for g in gaps[:-1]), gaps  # (the last:
    assert time.monotonic() - t0 < 1.5 + 0.5  # close's, not kept waiting)
    assert len(recall(tmp_path / "f.json").instances) == len(FLEET)


def test_close_does_not_wait_out_the_interval(tmp_path: Path) -> None:
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in FLEET}, 1))
    keeper = Remember(tmp_path / "f.json", catalog, every=30)
    keeper.changed()
    deadline = time.monotonic() + 5
    while not (tmp_path / "f.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    catalog.load(Snapshot({i.key: i for i in FLEET[:3]}, 2))
    keeper.changed()
    t0 = time.monotonic()
    keeper.close()
    assert time.monotonic() - t0 < 2
    assert len(recall(tmp_path / "f.json").instances) == 3


def test_a_file_too_old_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    old = time.time() - remember_mod.MAX_AGE_S - 5
    os.utime(path, (old, old))
    assert recall(path, SOURCE).instances == []
    watcher, thread = _started(_Read([]), path)
    try:
        assert watcher.catalog.size() == 0
    finally:
        _stopped(watcher, thread)


CUT = b'{"instances": [\n{"service": "a"}'  # the file as a crash mid-write would leave it


@pytest.mark.parametrize("text", [b"{not json", b"[]", b'{"instances": 3}',
                                  b'{"instances": [{"service": "a"}]}', b"\xff\xfe",
                                  CUT + b"\n]}\n", b'{"instances": [\n', b""])
def test_an_unusable_file_is_named_once_and_not_used(
        tmp_path: Path, text: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.last.json"
    path.write_bytes(text)
    with caplog.at_level(logging.WARNING, logger="discovery.watcher.remember"):
        assert recall(path, SOURCE).instances == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings


def test_the_file_holds_one_up_instance_a_line(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, [*FLEET[:2], _inst("x", 1, "n", State.DRAINING)])
    lines = path.read_text().splitlines()
    first = json.loads(path.read_text())["instances"][0]
    assert len(lines) == 4 and first["instance"]["state"] == "up"
    _kept(path, [])
    assert json.loads(path.read_text()) == {"registry": SOURCE, "instances": []}
    assert recall(path, SOURCE).instances == []


def test_a_file_nothing_changed_is_touched_so_a_long_quiet_catalog_is_still_used(
        tmp_path: Path) -> None:
    """Its time is when it was last known current: a catalog quiet for 10 minutes left a file
    its restart refused (written only at changes)."""
    path = tmp_path / "catalog.last.json"
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in FLEET}, 1))
    keeper = Remember(path, catalog, source=SOURCE, every=0.3)
    keeper.changed()
    wait_until(lambda: path.exists())
    old = time.time() - remember_mod.MAX_AGE_S - 60  # as if quiet for 11 minutes
    os.utime(path, (old, old))
    wait_until(lambda: path.stat().st_mtime > old)  # touched while nothing changes
    assert len(recall(path, SOURCE).instances) == len(FLEET)
    os.utime(path, (old, old))
    keeper.close()  # nothing changed since: touched at the stop
    assert time.time() - path.stat().st_mtime < 5
    assert len(recall(path, SOURCE).instances) == len(FLEET)
    keeper.close()  # (again: nothing)


def test_a_write_a_sigkill_cut_short_is_removed_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    left, fresh = tmp_path / f".{path.name}.abc.tmp", tmp_path / f".{path.name}.def.tmp"
    left.write_text('{"instances": [')
    fresh.write_text('{"instances": [')  # (another process writing it now: left alone)
    old = time.time() - 120
    os.utime(left, (old, old))
    assert len(recall(path, SOURCE).instances) == len(FLEET)
    assert not left.exists() and fresh.exists()


def _held_on(watcher: Watcher) -> None:
    """The guard's next look at what it holds is 20 s or more away (past the settle, and any
    round that releases or extends a hold, instead of a fixed wait)."""
    wait_until(lambda: (due := watcher.guard.next_due()) is not None
               and due - time.monotonic() > 20)


def wait_until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_what_the_guard_holds_is_written_with_its_time_and_a_successor_holds_it(
        tmp_path: Path) -> None:
    """Handed over (or crashed) during a wipe, the next watcher holds what its predecessor
    held: the file keeps each held instance with when its hold began. (Left out, as for a
    while, the successor of a watcher holding a wipe routed nothing.) A hold that began on a
    resync, which changes nothing in the catalog, is written too."""
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)
    watcher, thread = _started(_Read([]), path)
    try:
        wait_until(lambda: len(watcher.guard.held()) == len(FLEET))
        # written at once when it starts holding, not a gap (1 s here) after the first write
        wait_until(lambda: len(_held_in(path)) == len(FLEET), timeout=0.5)
    finally:
        _stopped(watcher, thread)
    first = _held_in(path)
    assert all(time.time() - since < 10 for since in first.values())
    again, thread = _started(_Read([]), path)
    try:
        assert again.catalog.size() == len(FLEET)
        wait_until(lambda: len(again.guard.held()) == len(FLEET))
    finally:
        _stopped(again, thread)
    again_held = _held_in(path)  # the hold's first time carried on, not the successor's
    assert again_held.keys() == first.keys()
    assert all(abs(again_held[k] - first[k]) < 0.01 for k in first), (first, again_held)


def test_a_hold_older_than_twice_hold_is_not_seeded_again(tmp_path: Path) -> None:
    """A watcher that keeps restarting through a real loss: each run seeded the dead instances
    and held them another ``hold``, for as long as it restarted."""
    path = tmp_path / "catalog.last.json"
    long_ago = time.time() - 2 * GuardSettings().hold - 5
    _file_with(path, FLEET, {i.key: long_ago for n, i in enumerate(FLEET) if n % 2})
    found = recall(path, SOURCE)
    assert {i.key for i in found.instances} == {i.key for n, i in enumerate(FLEET) if not n % 2}
    assert found.held == {}


def _held_in(path: Path) -> dict[tuple[str, str], float]:
    lines = json.loads(path.read_text())["instances"]
    return {(d["instance"]["service"], d["instance"]["id"]): d["held_since"]
            for d in lines if "held_since" in d}


def test_the_file_is_not_made_current_while_the_registry_is_away(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in FLEET}, 1))
    connected = [True]
    keeper = Remember(path, catalog, source=SOURCE, current=lambda: connected[0], every=0.2)
    keeper.changed()
    wait_until(lambda: path.exists())
    connected[0] = False  # the catalog kept through an outage: not the registry's now
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 0.8  # four touches' time
    while time.monotonic() < deadline:
        assert path.stat().st_mtime == old
        time.sleep(0.05)
    catalog.load(Snapshot({i.key: i for i in FLEET[:2]}, 2))
    keeper.changed()  # (a sync in an outage: a SIGHUP's, a hold released) nor written
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert path.stat().st_mtime == old
        time.sleep(0.05)
    keeper.close()
    assert path.stat().st_mtime == old and len(recall(path, SOURCE).instances) == len(FLEET)


def test_a_write_that_fails_is_tried_again_every_so_often_not_every_second(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in FLEET}, 1))
    keeper = Remember(blocked / "catalog.last.json", catalog, source=SOURCE, every=1.0)
    with caplog.at_level(logging.WARNING, logger="discovery.watcher.remember"):
        keeper.changed()
        wait_until(lambda: keeper.error is not None)
        deadline = time.monotonic() + 1.6  # (MIN_GAP_S is 1 s: a failed write made it one
        while time.monotonic() < deadline:  # a second, forever)
            assert len(caplog.records) <= 2
            time.sleep(0.05)
        keeper.close()
    assert 1 <= len(caplog.records) <= 3, [r.getMessage() for r in caplog.records]


def test_another_registrys_file_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET, source=source_of(RegistryURL.parse("etcd://127.0.0.1:2379/other")))
    assert recall(path, SOURCE).instances == []
    _seeds_nothing(_Read([]), path)


def test_the_files_age_is_taken_at_the_first_read_not_at_the_start(tmp_path: Path) -> None:
    """A registry away at the start: the first read came an hour later, compared with a
    catalog an hour old (its age was checked before the wait)."""
    path = tmp_path / "catalog.last.json"
    _kept(path, FLEET)

    class Late(_Read):
        def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
                  services: object = None) -> _Registry:
            old = time.time() - remember_mod.MAX_AGE_S - 5  # (the hour passes here)
            os.utime(path, (old, old))
            return super().watch(callback, start_revision, services)

    _seeds_nothing(Late([]), path)


def test_a_seeded_first_load_gives_each_service_its_own_index() -> None:
    """After a seed that the first read matched, no service had its own change index: every
    blocking query woke when any other service left the catalog."""
    web, db = FLEET[:2], _inst("db", 9, "node3")
    catalog = Catalog()
    catalog.seed([*web, db])
    catalog.load(Snapshot({i.key: i for i in [*web, db]}, 5))
    index = catalog.modified("svc0")
    catalog.apply(Change("delete", key=db.key, revision=6))  # db leaves the catalog
    assert catalog.modified("svc0") == index


def _file_with(path: Path, instances: list[Instance], held: dict[tuple[str, str], float]) -> None:
    lines = [json.dumps({"instance": i.to_dict(), **({"held_since": held[i.key]}
                                                       if i.key in held else {})})
             for i in instances]
    path.write_text('{"registry": ' + json.dumps(SOURCE) + ', "instances": [\n'
                    + ",\n".join(lines) + "\n]}\n")


def test_what_a_predecessor_held_is_held_whatever_the_first_read_looks_like(
        tmp_path: Path) -> None:
    """The predecessor held 3 services of 10 (a wipe whose other services were back): the
    successor's first read lacks only 30 of 100 instances, no wipe by the rule, and they were
    released after settling; its predecessor would have held them on."""
    path = tmp_path / "catalog.last.json"
    fleet = [_inst(f"svc{s}", 10 * s + k, f"node{k}") for s in range(10) for k in range(10)]
    lost = [i for i in fleet if i.service in ("svc0", "svc1", "svc2")]
    _file_with(path, fleet, {i.key: time.time() - 10 for i in lost})
    watcher, thread = _started(_Read([i for i in fleet if i not in lost]), path)
    try:
        wait_until(lambda: len(watcher.guard.held()) == len(lost))
        _held_on(watcher)
        assert watcher.catalog.up_count("svc0") == 10 and watcher.catalog.size() == 100
    finally:
        _stopped(watcher, thread)


def test_a_hold_counts_from_its_first_start_across_restarts(tmp_path: Path) -> None:
    """Held 46 s ago by a predecessor (hold 45 s): the successor holds it no longer; each run
    of a crash loop held it a full hold again before."""
    path = tmp_path / "catalog.last.json"
    lost = FLEET[:4]
    _file_with(path, FLEET, {i.key: time.time() - GuardSettings().hold - 1 for i in lost})
    watcher, thread = _started(_Read(FLEET[4:]), path)
    try:
        wait_until(lambda: watcher.catalog.size() == len(FLEET) - len(lost))
        assert watcher.guard.held() == []
    finally:
        _stopped(watcher, thread)


def test_a_hold_time_ahead_of_the_clock_is_taken_as_now(tmp_path: Path) -> None:
    """The wall clock stepped back since the predecessor wrote: its hold time lay an hour ahead,
    and the instance was held an hour and a hold (and written back so for the next)."""
    path = tmp_path / "catalog.last.json"
    _file_with(path, FLEET, {i.key: time.time() + 3600 for i in FLEET[:4]})
    watcher, thread = _started(_Read(FLEET[4:]), path)
    try:
        wait_until(lambda: len(watcher.guard.held()) == 4)
        due = watcher.guard.next_due()
        assert due is not None and due - time.monotonic() <= GuardSettings().hold + 1
    finally:
        _stopped(watcher, thread)


def test_what_a_predecessor_held_and_a_writer_drained_is_held_too(tmp_path: Path) -> None:
    path = tmp_path / "catalog.last.json"
    fleet = [replace(_inst(f"svc{s}", 10 * s + k, f"node{k}"), written_at=100.0)
             for s in range(10) for k in range(2)]
    lost = [i for i in fleet if i.service == "svc0"]
    _file_with(path, fleet, {i.key: time.time() - 5 for i in lost})
    read = [i if i not in lost else replace(i, state=State.DRAINING) for i in fleet]
    watcher, thread = _started(_Read(read), path)  # (drained by a script: its stamp kept)
    try:
        wait_until(lambda: len(watcher.guard.held()) == len(lost))
        _held_on(watcher)
        assert watcher.catalog.up_count("svc0") == 2 and len(watcher.guard.held()) == 2
    finally:
        _stopped(watcher, thread)


def test_a_predecessors_hold_goes_once_its_service_serves_again(tmp_path: Path) -> None:
    """svc0 had 5 of 10 instances held; the first read has the other 5 serving: the held ones
    go, as they would have on the predecessor (they waited out their whole hold)."""
    path = tmp_path / "catalog.last.json"
    fleet = [_inst(f"svc{s}", 10 * s + k, f"node{k}") for s in range(10) for k in range(10)]
    lost = fleet[:5]  # (5 of 100 gone: no wipe by the rule)
    _file_with(path, fleet, {i.key: time.time() - 5 for i in lost})
    watcher, thread = _started(_Read(fleet[5:]), path)
    try:
        wait_until(lambda: watcher.catalog.size() == 95 and watcher.guard.held() == [], 3)
    finally:
        _stopped(watcher, thread)


def test_held_ones_coming_back_keep_the_others_waiting_across_a_restart(tmp_path: Path) -> None:
    """Held 50 s ago (hold 45 s), 5 of 10 back in the first read: the other 5 wait on, as on
    the predecessor (twice hold at most while others come back); they went at once."""
    path = tmp_path / "catalog.last.json"
    fleet = [_inst(f"svc{k}", k, f"node{k}") for k in range(10)]
    _file_with(path, fleet, {i.key: time.time() - 50 for i in fleet})
    watcher, thread = _started(_Read(fleet[5:]), path)
    try:
        wait_until(lambda: len(watcher.guard.held()) == 5)
        _held_on(watcher)
        assert len(watcher.guard.held()) == 5 and watcher.catalog.size() == 10
    finally:
        _stopped(watcher, thread)


@pytest.mark.parametrize("keep_last", [True, False])
def test_a_watcher_with_dns_or_http_alone_keeps_the_last_catalog_in_its_state_dir(
        tmp_path: Path, keep_last: bool) -> None:
    """``watch --dns``/``--http`` or ``up`` with no routed service, ``dns --state-dir``: the
    state dir is made and the file kept there; ``dns`` without ``--state-dir`` keeps none
    (``keep_last``). Before, only a watcher running HAProxy kept one: a DNS-only host
    restarted while the registry was wiped answered nothing until the agents wrote back."""
    from discovery.watcher.assemble import HAProxySettings, assemble
    from discovery.watcher.config import WatcherConfig

    state = tmp_path / "state"  # not there yet
    watcher = assemble("etcd://127.0.0.1:9/unit", WatcherConfig(), HAProxySettings(state),
                       keep_last=keep_last)
    try:
        assert watcher.router is None
        if keep_last:
            assert watcher.remember is not None
            assert watcher.remember.path == state.absolute() / "catalog.last.json"
            assert state.is_dir()
        else:
            assert watcher.remember is None and not state.exists()
    finally:
        watcher.close()


def test_a_state_dir_a_watcher_with_dns_alone_cannot_use_keeps_none_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its default dir, not asked for (a root ``up``'s, say): one warning, nothing kept (not
    a failed write every 30 s for ever)."""
    from discovery.watcher.assemble import HAProxySettings, assemble
    from discovery.watcher.config import WatcherConfig

    taken = tmp_path / "file"
    taken.write_text("")
    watcher = assemble("etcd://127.0.0.1:9/unit", WatcherConfig(), HAProxySettings(taken))
    try:
        assert watcher.remember is None
        assert [r.getMessage() for r in caplog.records if "no last catalog kept" in
                r.getMessage()] == [f"--state-dir {taken.absolute()}: cannot create it: not a "
                                    "directory: no last catalog kept"]
    finally:
        watcher.close()
