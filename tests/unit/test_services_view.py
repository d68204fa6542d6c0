"""A view's watch when the routed services change (registry/view.py): the new watch's first
read takes over; the old watch runs on until then (its changes pass), and what it sends after
is dropped (it may lag behind that read). Pure logic: a scripted registry, no server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any

from discovery.errors import RegistryUnavailable
from discovery.model import Instance
from discovery.registry.base import Change, RegistryURL, Snapshot, read_first
from discovery.registry.reads import ReadStats
from discovery.registry.view import ServicesView
from tests.harness.util import wait_for


def inst(service: str, n: int) -> Instance:
    return Instance(service=service, id=f"h{n}:{n:012x}:80", node=f"h{n}",
                    address="127.0.0.1", port=8000 + n)


class Scripted:
    """Its watches read first (FIRST_READ, the reset in the caller's thread); ``during`` runs
    while a read is made; ``fails`` reads raise before one succeeds."""

    def __init__(self) -> None:
        self.url, self.reads = RegistryURL.parse("etcd://127.0.0.1:1/x"), ReadStats()
        self.callbacks: list[Callable[[Change], None]] = []
        self.stopped: list[int] = []
        self.during: Callable[[], None] = lambda: None
        self.fails = 0
        self.closed = False

    def close(self, revoke: bool = True) -> None:
        self.closed = True

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        self.during()
        if self.fails:
            self.fails -= 1
            raise RegistryUnavailable("the read failed")
        keep = [inst("web", 1), inst("api", 2)]
        return Snapshot({i.key: i for i in keep if services is None or i.service in services})

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Collection[str] | None = None) -> Any:
        read_first(start_revision, lambda: self.snapshot(services), callback)
        self.callbacks.append(callback)
        number, fake = len(self.callbacks) - 1, self

        class Handle:
            def stop(self) -> None:
                fake.stopped.append(number)
        return Handle()


def put(callback: Callable[[Change], None], i: Instance) -> None:
    callback(Change("put", key=i.key, instance=i))


def test_the_new_watch_takes_over_at_its_read_and_the_old_runs_on_until_then() -> None:
    inner = Scripted()
    view = ServicesView(inner, ["web"])  # type: ignore[arg-type]
    got: list[Change] = []
    lock = threading.Lock()

    def seen(change: Change) -> None:
        with lock:
            got.append(change)

    view.watch(seen, 0)
    [old] = inner.callbacks
    put(old, inst("web", 3))
    inner.fails = 1  # the first read of the new set fails: the old watch goes on meanwhile
    reads = 0

    def during() -> None:
        nonlocal reads
        reads += 1
        if reads == 2:  # the read that succeeds, made after the failed one
            put(old, inst("web", 4))  # the old watch, during the new read: passed on

    inner.during = during
    view.set_services(["web", "api"])
    wait_for(lambda: len(inner.callbacks) == 2 and inner.stopped == [0], 10,
             message="the new watch made, the old stopped")
    assert reads == 2
    put(old, inst("web", 5))  # the old watch, late: dropped
    put(inner.callbacks[1], inst("api", 6))
    with lock:
        kinds = [(c.kind, c.key[1][:2]) for c in got]
    assert kinds == [("put", "h3"), ("put", "h4"), ("reset", ""), ("put", "h6")], kinds
    reset = got[2].snapshot
    assert reset is not None and {k[0] for k in reset.instances} == {"web", "api"}
    view.close(revoke=False)
    assert inner.stopped == [0, 1] and inner.closed
