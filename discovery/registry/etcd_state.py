"""An etcd registry's state (etcd reachable or not) and the listeners told when it changes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from discovery.registry.base import StateCallback

log = logging.getLogger(__name__)


class StateBoard:
    """``set(up)`` from any call or stream; ``back()`` is called when etcd answers again
    after it did not, ``leased()`` says whether the registry holds a lease (for the log)."""

    def __init__(self, where: str, back: Callable[[], None], leased: Callable[[], bool]) -> None:
        self._where, self._back, self._leased = where, back, leased
        self.lock = threading.RLock()
        self._notify_lock = threading.Lock()
        self._listeners: list[StateCallback] = []
        self.up: bool | None = None

    def add(self, callback: StateCallback) -> None:
        with self.lock:
            self._listeners.append(callback)

    def set(self, up: bool) -> None:
        with self.lock:
            if self.up == up:
                return
            if up and self.up is False:
                self._back()  # what the keeper was refused: tried again soon
            self.up = up
            if not up:
                log.warning("etcd at %s unreachable", self._where)
            elif self._leased():
                log.info("etcd at %s reachable again", self._where)
        # Listeners run outside the lock: a listener that waits for its owner's lock must
        # never hold up a thread that owns that lock and is in a registry call (a deadlock
        # bench/faults.py found). One at a time, each told the latest state, so the last
        # word a listener hears is the current one whatever order threads arrive in.
        with self._notify_lock:
            latest = self.up
            for cb in list(self._listeners):
                try:
                    cb(bool(latest))
                except Exception:
                    log.exception("registry state listener failed")
