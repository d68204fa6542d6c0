"""The daemons' malloc arenas (``discovery.heap.fewer_malloc_arenas``): 2 unless the user
set ``MALLOC_ARENA_MAX``, and nothing without glibc's ``mallopt``."""

from __future__ import annotations

import ctypes

import pytest

from discovery.heap import MALLOC_ARENAS, fewer_malloc_arenas, give_back


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


def test_the_servers_give_back_after_a_whole_build_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DNS server after a zone that took many services again (its first, a reset), the
    HTTP API after serialising as many (not after one service's change)."""
    from discovery import heap
    from discovery.lookup import dns, http_whole
    from discovery.lookup.dns import DnsServer
    from discovery.lookup.http_whole import WholeCatalog
    from discovery.model import Instance
    from discovery.model.catalog import Catalog
    from discovery.registry.base import Change, Snapshot

    given: list[str] = []
    monkeypatch.setattr(dns, "give_back", lambda: given.append("dns") or True)
    monkeypatch.setattr(http_whole, "give_back", lambda: given.append("http") or True)
    monkeypatch.setattr(dns, "REBUILD_WAIT", 0.0)
    many = [Instance(service=f"s{n}", id=f"h:{n:012x}:80", node="h", address="127.0.0.1",
                     port=80) for n in range(heap.MANY)]
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in many}, revision=1))
    server, kept = DnsServer(catalog, port=0), WholeCatalog(catalog)  # (not started)
    server.zone()
    kept.body()
    assert given == ["dns", "http"]
    catalog.apply(Change("put", many[0].key, Instance(**{
        f: getattr(many[0], f) for f in ("service", "id", "node", "address")}, port=81)))
    assert server.zone().index == catalog.index and kept.body()
    assert given == ["dns", "http"]  # one service taken again: nothing to give back
