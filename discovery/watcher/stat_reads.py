"""What HAProxy's own ``show stat`` tells the router, besides the outlier counters
(:mod:`discovery.watcher.outlier`): which slots still have sessions (:class:`Busy`, before a
freed slot takes a new instance) and which instances its health checks hold down
(:class:`CheckedDown`, for zone-aware routing: :mod:`discovery.watcher.zones`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping

from discovery.errors import HAProxyError
from discovery.retry import RetryAt
from discovery.watcher.supervisor import HAProxyControl

log = logging.getLogger(__name__)

Stat = Mapping[tuple[str, str], Mapping[str, str]]
#: how often the checks of the services routed by zone (``check = true``) are read: every
#: second, or, when ``show stat`` of every backend takes longer (~0.5 s at 1,000 services),
#: COST times as long as it took (at most a tenth of the time, under the router's lock)
CHECK_READ = 1.0
COST = 10.0
#: after a failed read (a timeout takes 2 s): the wait doubles from CHECK_READ to this
CHECK_FAILED_MAX = 30.0


class Busy:
    """Which slots of a backend still have sessions (``scur``), read once per backend and sync
    and only when a slot that served before is about to take a new instance: that backend's
    ``show stat`` alone (every backend's took ~0.5 s a sync at 1,000 services)."""

    def __init__(self, control: HAProxyControl | None) -> None:
        self.control = control
        self._stat: dict[str, dict[tuple[str, str], dict[str, str]]] = {}

    def of(self, backend: str) -> Callable[[str], bool]:
        def busy(slot: str) -> bool:
            if self.control is None:
                return False
            if backend not in self._stat:
                try:
                    self._stat[backend] = self.control.runtime.stat(backend)
                except HAProxyError as exc:
                    log.warning("cannot read sessions (%s): freed slots are not reused now", exc)
                    return True
            return self._stat[backend].get((backend, slot), {}).get("scur", "0") not in ("0", "")
        return busy


class CheckedDown:
    """The instances HAProxy's health checks hold down (``status`` DOWN, ``DOWN 1/2`` rising
    included), per service routed by zone with ``check = true``. The local zone counts only
    the others as up: one that the registry calls up but HAProxy cannot reach (a bad record, a
    path down between this host and it) would otherwise keep every other zone at weight 0, and
    HAProxy, with no server it may use, answers 503."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.down: dict[str, set[str]] = {}
        self.next_read = 0.0
        self._failing = RetryAt(CHECK_READ, CHECK_FAILED_MAX)

    def due(self, services: Collection[str]) -> float | None:
        """When to read next (monotonic); None: no service is routed by zone with checks."""
        if not services and self.down:
            self.down.clear()  # (the setting went: nothing held back any more)
        return self.next_read if services else None

    def failed(self) -> None:
        """``show stat`` failed (timed out, maybe): the last reading stands until the next,
        CHECK_READ s away, the wait doubling while it fails (a read that times out after 2 s,
        tried every second, held the router's lock two thirds of the time)."""
        self.next_read = self._clock() + self._failing.failed()

    def observe(self, services: Collection[str], stat: Stat,
                slots: Mapping[str, Mapping[str, str]], took: float = 0.0) -> set[str]:
        """One reading, that took ``took`` s (``slots``: per service, slot -> instance id);
        the services whose down set changed."""
        changed = set(self.down) - set(services)
        for svc in changed:
            del self.down[svc]
        for svc in services:
            down = {iid for slot, iid in slots.get(svc, {}).items()
                    if stat.get((svc, slot), {}).get("status", "").startswith("DOWN")}
            if down != self.down.get(svc, set()):
                changed.add(svc)
                if down:
                    self.down[svc] = down
                else:
                    self.down.pop(svc, None)
        self.next_read = self._clock() + max(CHECK_READ, COST * took)
        self._failing.succeeded()
        return changed
