"""The agent's registry writes, queued: the newest wish for each key, written in order by a
thread that runs while any is pending.

Whatever decides (Docker events, check transitions, maintenance, the reconcile) does so under
the agent's lock and only adds a :class:`Wish` here, which returns at once; the writes go out
one at a time on the writer's own thread, under the lock given (``io``: what they change is
stable while it is held). A newer wish for a key replaces one not yet written, so a decision
always wins over an older one, wherever it came from (kazoo's ``TreeCache`` the model: one
queue, in order, no lock shared with the callers' work).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

from discovery.agent.history import Cause
from discovery.agent.tracked import Key
from discovery.model import Instance

log = logging.getLogger(__name__)


class Wish(NamedTuple):
    """What the registry should hold under a key: ``instance``, or nothing (None)."""

    instance: Instance | None
    cause: Cause | None = None  # noted in the instance's history once written
    force: bool = False  # a put written even if the same as the last write (the registry lost it)
    departs: Cause | None = None  # the instance left (its history says why, once written)
    left: Cause | None = None  # it had left before this wish (a departure it replaced)


class Wishes:
    def __init__(self, write: Callable[[Key, Wish], None], io: threading.Lock,
                 on_error: Callable[[Key], object]) -> None:
        self._write, self._io, self._on_error = write, io, on_error
        self._pending: dict[Key, Wish] = {}
        self._idle = threading.Condition()  # guards the three below; told when all is done
        self._writing = False  # a writer thread runs (or is about to)
        self._current: tuple[Key, Wish] | None = None  # the write under way

    def add(self, key: Key, wish: Wish) -> None:
        """``wish`` for ``key``, in place of one not yet written: its ``force`` kept while an
        instance is wanted (the registry still lacks it), its departure kept as ``left`` (the
        same container back: the history tells both, in order)."""
        with self._idle:
            old = self._pending.get(key)
            if old is not None:
                if old.force and wish.instance is not None:
                    wish = wish._replace(force=True)
                if (old.departs or old.left) and not wish.departs:
                    wish = wish._replace(left=old.departs or old.left)
            self._pending[key] = wish
            if self._writing:
                return
            self._writing = True
        try:
            threading.Thread(target=self._run, name="registry-writes", daemon=True).start()
        except RuntimeError:  # no thread to be had: the next wish starts one
            with self._idle:
                self._writing = False
            raise

    def _run(self) -> None:
        """The writer thread: writes what is pending until nothing is, then ends."""
        while True:
            with self._io:
                with self._idle:
                    if not self._pending:
                        self._writing = False
                        self._idle.notify_all()
                        return
                    key = next(iter(self._pending))
                    self._current = key, self._pending.pop(key)
                try:
                    self._write(*self._current)
                except Exception:  # a bug: logged; the writer goes on, the reconcile mends
                    log.exception("registry write for %s/%s failed", *key)
                    self._on_error(key)
                finally:
                    self._current = None

    def count(self) -> int:
        """The wishes not yet written, the one under way included."""
        with self._idle:
            return len(self._pending) + (self._current is not None)

    def keys(self) -> set[Key]:
        """The keys with a wish not yet written."""
        with self._idle:
            return set(self._pending)

    def force(self, keys: set[Key]) -> None:
        """Those of ``keys`` whose pending wish is a put: written even if the same as the last
        write (the registry lost them)."""
        with self._idle:
            for key in keys:
                wish = self._pending.get(key)
                if wish is not None and wish.instance is not None:
                    self._pending[key] = wish._replace(force=True)

    def wished(self) -> list[tuple[Key, Wish]]:
        """The write under way, then the pending ones, oldest first."""
        with self._idle:
            return ([self._current] if self._current else []) + list(self._pending.items())

    def drop(self) -> list[tuple[Key, Wish]]:
        """Forget the wishes not yet written; returned."""
        with self._idle:
            dropped, self._pending = list(self._pending.items()), {}
        return dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no write is pending or under way; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._writing and not self._pending, timeout)
