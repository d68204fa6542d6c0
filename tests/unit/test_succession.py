"""A follower's watches one after another (``discovery.registry.succession``): the new one's
read makes it current, the old one's later changes are dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any

import pytest

from discovery.errors import RegistryError
from discovery.registry.base import FIRST_READ, Change, Snapshot
from discovery.registry.succession import Succession


class _Watch:
    def __init__(self, callback: Callable[[Change], None]) -> None:
        self.callback = callback

    def stop(self) -> None:
        pass


class _Registry:
    """Delivers a FIRST_READ watch's reset within ``watch()``, as every backend does; or
    raises, as a failed read does."""

    def __init__(self) -> None:
        self.fail = False
        self.asked: list[tuple[int, Collection[str] | None]] = []

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Collection[str] | None = None) -> _Watch:
        self.asked.append((start_revision, services))
        if self.fail:
            raise RegistryError("unreachable")
        callback(Change("reset", snapshot=Snapshot()))
        return _Watch(callback)


def _follower() -> tuple[Succession, _Registry, list[tuple[int, str, str]], Any]:
    watches, registry = Succession(), _Registry()
    lock = threading.Lock()
    got: list[tuple[int, str, str]] = []

    def callback(number: int, change: Change) -> None:
        with lock:
            got.append((number, change.kind, watches.take(number, change)))

    return watches, registry, got, (callback, lock)


def test_the_new_watchs_read_makes_it_current_and_the_old_ones_changes_are_dropped() -> None:
    watches, registry, got, (callback, lock) = _follower()
    assert watches.take(0, Change("put")) == "current"  # watch 0, made as the first one
    number, new = watches.make(registry, callback, {"web"}, lock)  # type: ignore[arg-type]
    assert registry.asked == [(FIRST_READ, {"web"})]
    assert got == [(number, "reset", "first")]
    assert watches.current == number == 1
    assert watches.take(0, Change("delete")) == ""  # the old watch, lagging: dropped
    new.callback(Change("put"))
    assert got[-1] == (1, "put", "current")


def test_a_reset_outside_a_make_switches_nothing() -> None:
    """A later reset of an old watch (its session expired), or of a watch whose make was
    given up, is not a new watch's read."""
    watches, registry, _got, (callback, lock) = _follower()
    first, _ = watches.make(registry, callback, None, lock)  # type: ignore[arg-type]
    assert watches.take(0, Change("reset", snapshot=Snapshot())) == ""
    assert watches.take(first, Change("reset", snapshot=Snapshot())) == "current"
    assert watches.take(first + 1, Change("reset", snapshot=Snapshot())) == ""
    assert watches.current == first


def test_a_failed_read_leaves_the_current_watch() -> None:
    watches, registry, got, (callback, lock) = _follower()
    registry.fail = True
    with pytest.raises(RegistryError):
        watches.make(registry, callback, {"web"}, lock)  # type: ignore[arg-type]
    assert watches.current == 0 and watches.take(0, Change("put")) == "current"
    registry.fail = False
    number, _ = watches.make(registry, callback, {"web"}, lock)  # type: ignore[arg-type]
    assert number == 2 and watches.current == 2 and got == [(2, "reset", "first")]
