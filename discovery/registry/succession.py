"""A follower's watches, one after another: the new one beside the current until its read.

A follower whose services change (a watcher's SIGHUP through
:class:`~discovery.registry.view.ServicesView`, a client asked for more services:
:class:`~discovery.client_catalog.LiveCatalog`) makes a new watch that reads first
(:data:`~discovery.registry.base.FIRST_READ`) while its current one runs on: a registry away
for a while still delivers the current watch's changes, and nothing falls between the two.
The new watch's read, the ``reset`` a registry delivers before ``watch()`` returns, makes it
the current one; what the old one delivers from then on is dropped (it may lag behind that
read), and the follower stops it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Literal

from discovery.registry.base import FIRST_READ, Change, Registry, Watch

#: what :meth:`Succession.take` makes of a change: the read of the watch being made (now
#: the current one), a change of the current watch, or one to drop ("")
Taken = Literal["first", "current", ""]


class Succession:
    """Numbers a follower's watches. The follower makes one at a time and holds ``lock`` (the
    one given to :meth:`make`) around :meth:`take`. Watch 0, the follower's first, made
    without :meth:`make`, is the current one until a made one's read."""

    def __init__(self) -> None:
        self.current = 0  # the watch whose changes are passed on
        self._making = 0  # the watch being made: its read makes it the current one
        self._made = 0

    def make(self, registry: Registry, callback: Callable[[int, Change], None],
             services: Collection[str] | None,
             lock: AbstractContextManager[Any]) -> tuple[int, Watch]:
        """A new watch of ``services`` (None: all) that reads first, its changes handed to
        ``callback(number, change)``; raises what its read raises (no watch is left then)."""
        with lock:
            self._made += 1
            number = self._making = self._made
        try:
            return number, registry.watch(partial(callback, number), FIRST_READ,
                                          services=services)
        finally:
            with lock:
                self._making = 0

    def take(self, number: int, change: Change) -> Taken:
        """Under the lock: what ``change`` from watch ``number`` is to the follower."""
        if number and number == self._making and change.kind == "reset":
            self.current, self._making = number, 0
            return "first"
        return "current" if number == self.current else ""
