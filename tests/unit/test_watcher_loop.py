"""The watcher's run loop sleeps between changes: it must not wake itself (a busy loop cost
a whole core in ``discovery up``, bench/footprint.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from discovery.model import Instance
from discovery.registry.base import Change, Snapshot, read_first
from discovery.registry.reads import ReadStats
from discovery.watcher import core
from discovery.watcher.core import Watcher


class _Registry:
    """Just enough of a Registry for a Watcher without a router."""

    url = "etcd://127.0.0.1:2379/unit"
    invalid_records = 0

    def __init__(self) -> None:
        self.reads = ReadStats()
        self.callback: Callable[[Change], None] | None = None

    def add_state_listener(self, callback: Any) -> None:
        pass

    def snapshot(self, services: Any = None) -> Snapshot:
        return Snapshot({}, 1)

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Any = None) -> _Registry:
        read_first(start_revision, self.snapshot, callback)  # the watcher starts FIRST_READ
        self.callback = callback
        return self

    def stop(self) -> None:
        self.callback = None

    def close(self, revoke: bool = True) -> None:
        pass


def test_an_idle_watcher_loop_sleeps_and_a_change_still_wakes_it() -> None:
    registry = _Registry()
    watcher = Watcher(registry, None)  # type: ignore[arg-type]
    rounds = 0
    due = watcher.guard.due

    def counted() -> list[Change]:
        nonlocal rounds
        rounds += 1
        return due()

    watcher.guard.due = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        assert watcher.wait_ready(10)
        rounds_at_start, t0 = rounds, time.monotonic()
        time.sleep(1.5)  # idle: the loop waits up to 1 s at a time
        idle_rounds = rounds - rounds_at_start
        assert idle_rounds <= 1 + (time.monotonic() - t0) / 1.0, idle_rounds
        assert registry.callback is not None
        web = Instance(service="web", id="h:000000000001:80", node="h", address="192.0.2.1",
                       port=80, registered_at=1.0)
        registry.callback(Change("put", web.key, web, revision=2))
        deadline = time.monotonic() + 5
        while watcher.catalog.size() != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.catalog.get(web.key) == web
    finally:
        watcher.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_a_watcher_stopped_during_its_first_read_is_never_ready() -> None:
    """A stop while the first read is made (SIGTERM of a starting `discovery watch`): no sync,
    never ready (a ready one would take its predecessor's DNS/HTTP listeners over, then go)."""
    registry = _Registry()
    watcher = Watcher(registry, None)  # type: ignore[arg-type]
    read = registry.snapshot

    def slow_read(services: Any = None) -> Snapshot:
        watcher.stop()  # comes while the read is made; the read still succeeds
        return read(services)

    registry.snapshot = slow_read  # type: ignore[method-assign]
    synced: list[object] = []
    watcher.sync = lambda *a: synced.append(a)  # type: ignore[method-assign]
    watcher.run()
    assert not watcher.wait_ready(0) and synced == []
    assert watcher.catalog.loaded  # the read's reset came; nothing was made of it


def test_a_round_that_raises_is_logged_and_tried_again_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug met while applying (maybe by every host at once: the same registry value) must
    not end the watcher's loop, which would freeze this host's routing until a restart."""
    registry = _Registry()
    watcher = Watcher(registry, None)  # type: ignore[arg-type]
    synced = threading.Event()
    calls = 0
    sync = watcher.sync

    def flaky(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first sync after ready: a bug
            raise RuntimeError("boom")
        sync(*args)
        if calls >= 3:
            synced.set()

    watcher.sync = flaky  # type: ignore[method-assign]
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        assert watcher.wait_ready(10)
        assert registry.callback is not None
        web = Instance(service="web", id="h:000000000001:80", node="h", address="192.0.2.1",
                       port=80, registered_at=1.0)
        registry.callback(Change("put", web.key, web, revision=2))
        assert synced.wait(3 * core.RETRY_S + 5)  # tried again, without another change
        assert thread.is_alive()
        assert [r for r in caplog.records if "applying the catalog failed" in r.getMessage()]
    finally:
        watcher.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_a_sync_that_raises_keeps_what_changed_for_the_next() -> None:
    """The services changed since the last sync are handed to the router once; a sync that
    raised (run() tries it again) dropped them, and the next one synced nothing."""
    watcher = Watcher(_Registry(), None)  # type: ignore[arg-type]
    asked: list[set[str] | None] = []

    class Router:
        stats = None

        def sync(self, catalog: Any, only: set[str] | None) -> None:
            asked.append(None if only is None else set(only))
            if len(asked) == 1:
                raise RuntimeError("can't start new thread")

    watcher.router = Router()  # type: ignore[assignment]
    watcher.metrics.sync_router = lambda stats: None  # type: ignore[method-assign]
    watcher._changed = {"web"}
    with pytest.raises(RuntimeError):
        watcher.sync()
    watcher._changed.add("db")  # a change meanwhile
    watcher.sync()
    assert asked == [{"web"}, {"web", "db"}]


def test_a_replaced_process_watch_gives_its_pidfd_back() -> None:
    """Each start attempt watches its master through a pidfd; one replaced (a start tried
    again every few seconds while it fails) kept its descriptor open for good."""
    import gc
    import os

    from discovery.watcher.adopt import Watched

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        watched = Watched(os.getpid())
    del watched
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_a_sighup_applies_the_loops_own_wait_and_reload_interval() -> None:
    """``[watcher] wait`` and ``reload_min_interval`` are the loop's too (its quiescence and
    the wait before a structural reload): a SIGHUP gave them to the router alone."""
    from dataclasses import replace as with_

    from discovery.watcher.assemble import reconfigure
    from discovery.watcher.config import WatcherConfig

    watcher = Watcher(_Registry(), None, wait=(0.02, 1.0))  # type: ignore[arg-type]
    given: list[WatcherConfig] = []

    class Router:
        def set_config(self, config: WatcherConfig, renderer: Any = None) -> None:
            given.append(config)

    watcher.router = Router()  # type: ignore[assignment]
    new = with_(WatcherConfig(), wait_min=0.5, wait_max=4.0, reload_min_interval=7.0)
    reconfigure(watcher, lambda: new)
    assert given == [new]
    assert (watcher.wait_min, watcher.wait_max, watcher.reload_min_interval) == (0.5, 4.0, 7.0)


def test_a_first_sync_that_raises_does_not_end_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug met at the first sync (a registry value every host has) ended run(), and
    `discovery watch` then stopped the HAProxy it had adopted: every restarted host went dark.
    It is tried again, as a bug in any later round is."""
    monkeypatch.setattr(core, "RETRY_S", 0.05)
    watcher = Watcher(_Registry(), None)  # type: ignore[arg-type]
    calls: list[float] = []
    sync = watcher.sync

    def failing_once() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug")
        sync()

    watcher.sync = failing_once  # type: ignore[method-assign]
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        assert watcher.wait_ready(10)
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 2 and thread.is_alive()
    finally:
        watcher.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_sighup_reloads_run_one_at_a_time() -> None:
    from discovery.watcher.assemble import reconfigure
    from discovery.watcher.config import WatcherConfig

    watcher = Watcher(_Registry(), None)  # type: ignore[arg-type]
    inside: list[str] = []
    release = threading.Event()

    def load(name: str) -> Callable[[], WatcherConfig]:
        def read() -> WatcherConfig:
            inside.append(name)
            if name == "first":
                assert release.wait(5)
            inside.append(f"/{name}")
            return WatcherConfig()
        return read

    first = threading.Thread(target=reconfigure, args=(watcher, load("first")))
    first.start()
    deadline = time.monotonic() + 5
    while inside != ["first"] and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=reconfigure, args=(watcher, load("second")))
    second.start()
    second.join(0.3)
    assert inside == ["first"] and second.is_alive()  # waits for the first to finish
    release.set()
    first.join(5)
    second.join(5)
    assert inside == ["first", "/first", "second", "/second"]
