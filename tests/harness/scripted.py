"""A registry in memory for pure-logic tests of what follows a registry: its watches read
first (``FIRST_READ``: the read handed over as a ``reset`` in the thread that called
``watch()``), and a test scripts what happens while a read is made."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from discovery.errors import RegistryUnavailable
from discovery.registry.base import Change, Snapshot, read_first
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL


class ScriptedRegistry:
    """Reads ``snapshot`` (of the services asked); ``during`` runs while any read is made (a
    watch's and a plain ``snapshot()`` alike), ``fails`` reads raise before one succeeds.
    Each watch's callback is kept in ``callbacks``, in order; ``stopped`` lists the numbers of
    those stopped."""

    invalid_records = 0

    def __init__(self, snapshot: Snapshot, url: str = "etcd://127.0.0.1:1/x") -> None:
        self.url, self.snap, self.reads = RegistryURL.parse(url), snapshot, ReadStats()
        self.callbacks: list[Callable[[Change], None]] = []
        self.stopped: list[int] = []
        self.during: Callable[[], None] = lambda: None
        self.fails = 0
        self.closed = False

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        self.during()
        if self.fails:
            self.fails -= 1
            raise RegistryUnavailable("the read failed")
        return replace(self.snap, instances={k: i for k, i in self.snap.instances.items()
                                             if services is None or k[0] in services})

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Collection[str] | None = None) -> Any:
        read_first(start_revision, lambda: self.snapshot(services), callback)
        self.callbacks.append(callback)
        number, fake = len(self.callbacks) - 1, self

        class Handle:
            def stop(self) -> None:
                fake.stopped.append(number)
        return Handle()

    def add_state_listener(self, callback: Callable[[bool], None]) -> None:
        pass

    def close(self, revoke: bool = True) -> None:
        self.closed = True
