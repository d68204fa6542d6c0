"""The daemons' malloc arenas (``discovery.cli.app.fewer_malloc_arenas``): 2 unless the user
set ``MALLOC_ARENA_MAX``, and nothing without glibc's ``mallopt``."""

from __future__ import annotations

import ctypes

from discovery.cli.app import MALLOC_ARENAS, fewer_malloc_arenas


class Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
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
