"""The daemons' malloc arenas (``discovery.heap.fewer_malloc_arenas``): 2 unless the user
set ``MALLOC_ARENA_MAX``, and nothing without glibc's ``mallopt``; their freed memory given
back every period (``keep_giving_back``)."""

from __future__ import annotations

import ctypes
import threading

from discovery.heap import MALLOC_ARENAS, fewer_malloc_arenas, give_back, keep_giving_back
from tests.harness.util import wait_for


class Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append((0, pad))
        return 1


def test_arenas_are_limited_when_the_user_set_nothing() -> None:
    libc = Libc()
    assert fewer_malloc_arenas({}, libc) is True
    assert libc.calls == [(-8, MALLOC_ARENAS)]  # M_ARENA_MAX


def test_the_users_malloc_arena_max_wins() -> None:
    libc = Libc()
    assert fewer_malloc_arenas({"MALLOC_ARENA_MAX": "8"}, libc) is False
    assert libc.calls == []


def test_no_mallopt_no_change() -> None:
    assert fewer_malloc_arenas({}, object()) is False


def test_glibc_takes_it() -> None:
    assert fewer_malloc_arenas({}, ctypes.CDLL(None)) is True  # the machines run glibc


def test_a_big_builds_memory_is_given_back() -> None:
    libc = Libc()
    assert give_back(libc) is True and libc.calls == [(0, 0)]  # malloc_trim(0)
    assert give_back(object()) is False  # no glibc: nothing
    assert hasattr(ctypes.CDLL(None), "malloc_trim")  # the machines run glibc: a real call


def test_a_daemon_gives_back_every_period_until_stopped() -> None:
    libc, stop = Libc(), threading.Event()
    thread = keep_giving_back(0.01, stop, libc)
    assert thread is not None and thread.daemon
    wait_for(lambda: len(libc.calls) >= 3, 5, message="three give-backs")
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and set(libc.calls) == {(0, 0)}
    assert keep_giving_back(0.01, stop, object()) is None  # no glibc: no thread
