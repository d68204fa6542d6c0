"""The last catalog on disk, so that a watcher restarted during a registry-side wipe sees it.

The wipe guard (:mod:`discovery.watcher.guard`) tells a wipe by what a burst of removals takes
from the catalog the watcher holds. A watcher that starts while the registry is wiped (the
prefix deleted, every lease revoked, an empty backup restored; its agents not back yet) holds
nothing to compare its first read with: before, it took the empty registry as it was, and
converged the HAProxy it adopted to that, so its host routed nothing until the agents wrote
their instances back. A fleet whose watchers restart then (an upgrade rolling out, a crash
that the same registry value causes everywhere) blacks out host after host.

So the watcher keeps what is *up* in its catalog in ``<state dir>/catalog.last.json``, written
by a thread of its own while the catalog changes (at most every ``COST`` times as long as a
write takes, 1 to 30 s apart), touched every 30 s while it does not, and written or touched
once more when it stops (SIGUSR2: before the handover, as the successor reads it at its
start); written and touched only while the registry is connected (a catalog kept through an
outage is not the registry's); what the guard holds with when its hold began (a successor
holds it too, at once, with ``hold`` counted from then: a watcher restarting every minute
through a real loss would hold the dead instances for ever); naming its registry (scheme,
prefix, layout). At the first read (not at the start: a registry
away for an hour then), a file of the same registry made current within :data:`MAX_AGE_S`
seeds the catalog (:meth:`~discovery.model.catalog.Catalog.seed`: nothing answers from it),
and that read comes to the guard as a resync of that catalog: a wipe is held as it is on a
watcher that ran through it. An older file is not used (a host away that long finds its fleet
changed, and a guard that took the change for a wipe would route to instances long gone). The
file is a hint: one that cannot be read or parsed is named in one warning and not used; a
write that fails is tried again ``EVERY_S`` later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discovery.errors import InvalidRecord
from discovery.files import stage
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)
Key = tuple[str, str]

FILE = "catalog.last.json"
#: while the catalog changes, a write at most every ``COST`` times as long as the last one took,
#: at least :data:`MIN_GAP_S` and at most :data:`EVERY_S` apart (the whole catalog's up
#: instances: 4.5 MB and 0.09 s for 10,000 of them, every 9 s at most; every host of a fleet
#: writing that at every change anywhere would keep disks busy for nothing; a small catalog,
#: where a few departures are a large share, is kept within a second or so)
COST = 100
MIN_GAP_S = 1.0
SOON_S = 0.1  # the least wait of a write asked at once (the guard started holding)
EVERY_S = 30.0
#: a file not made current for this long is not used (the watcher touches it every
#: :data:`EVERY_S` while nothing changes, and at its stop): what it names has had time to
#: change for good
MAX_AGE_S = 600.0


class Remember:
    """Keeps ``catalog``'s up instances at ``path``: :meth:`changed` after each sync,
    :meth:`close` once (a last write if anything changed since the one before, else a touch:
    the file's time is when it was last known current). ``source`` names the registry (the
    file of another is not used); ``current()``: whether the catalog is the registry's now
    (connected: a catalog kept through an outage is neither written nor made current);
    ``held()``: the keys the wipe guard holds and since when (monotonic), written with the
    instance (``held_since``, the wall clock): a successor holds them at once from then
    (:meth:`~discovery.watcher.guard.WipeGuard.preheld`, so ``hold`` counts from the first
    hold across restarts: a watcher restarting again and again through a real loss does not
    hold the dead instances for ever), and one handed over during a wipe still holds them."""

    def __init__(self, path: Path, catalog: Catalog, *, source: str = "",
                 current: Callable[[], bool] = lambda: True,
                 held: Callable[[], Mapping[Key, float]] = dict,
                 every: float = EVERY_S) -> None:
        self.path = path
        self.catalog = catalog
        self.source, self._current, self._held = source, current, held
        self.every = every
        self.error: str | None = None  # why the last write failed
        self._cond = threading.Condition()
        self._dirty = False
        self._at_once = False  # the next write is due now, whatever the gap
        self._closed = False
        self._gap = MIN_GAP_S  # the least time between two writes (from the last one's cost)
        self._soon = SOON_S  # ... when written at once
        self._last = -float("inf")  # monotonic time of the last write or touch
        self._thread: threading.Thread | None = None

    def changed(self, at_once: bool = False) -> None:
        """The catalog changed: written within ``every`` seconds (``at_once``: within 10 times
        the last write's cost, 0.1 s at least, as when the guard starts holding: rare, and a
        restart soon after must know since when it held). Returns at once."""
        with self._cond:
            if self._closed:
                return
            self._dirty = True
            self._at_once |= at_once
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="remember", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def close(self) -> None:
        """Write what changed since the last write, or touch the file (now, not later), then
        stop. Again: nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:  # due: a change once the gap is over; else a touch
                    gap = (self._soon if self._at_once else self._gap if self._dirty
                           else self.every)
                    wait = self._last + min(self.every, gap) - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                dirty, closing, at_once = self._dirty, self._closed, self._at_once
                self._dirty = self._at_once = False
            started = time.monotonic()
            if dirty and not self._current():  # an outage: nothing the registry's to write
                with self._cond:
                    self._dirty, self._at_once = True, self._at_once or at_once
                self._last = time.monotonic()
                if closing:
                    return
                continue
            if dirty or not self._touch():
                written = self.write()  # (a failure: tried again ``every`` later, not at once)
                took = time.monotonic() - started
                self._gap = self.every if not written else min(
                    self.every, max(MIN_GAP_S, COST * took))
                self._soon = min(self._gap, max(SOON_S, 10 * took))
            self._last = time.monotonic()
            if closing:
                return

    def _touch(self) -> bool:
        """The file made current as it is (nothing changed since its write); False: not there.
        Not while the catalog is not the registry's (True: nothing to do)."""
        if not self._current():
            return True
        try:
            os.utime(self.path)
        except OSError:
            return False
        return True

    def write(self) -> bool:
        """Write the file now; False: it failed (logged; tried again ``every`` later)."""
        now, wall = time.monotonic(), time.time()
        held = {k: wall - (now - since) for k, since in self._held().items()}
        try:  # staged, then renamed: never read back to compare (install() would: two copies
            staged = stage(_pieces(self.catalog.instances(), held, self.source),  # of a 4.5 MB
                           self.path)  # file, and glibc keeps the heap they grew: +3.4 MB
            try:  # in bench/footprint.py)
                os.replace(staged, self.path)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
        except Exception as exc:  # a full disk, a folder gone: the file is a hint
            self.error = f"{self.path}: cannot write the last catalog: {exc}"
            log.warning("%s", self.error, exc_info=not isinstance(exc, OSError))
            with self._cond:
                self._dirty = True
            return False
        self.error = None
        return True


def _header(source: str) -> str:
    return '{"registry": ' + json.dumps(source) + ', "instances": ['


def _pieces(instances: list[Instance], held: Mapping[Key, float],
            source: str) -> Iterator[str]:
    """``{"registry": source, "instances": [...]}``, one instance a line, ``{"instance": ...}``
    with ``"held_since"`` when held (no one reads it but :func:`recall`, which parses it a line
    at a time)."""
    yield _header(source)
    first = True
    for inst in instances:
        if inst.state is State.UP:
            line: dict[str, Any] = {"instance": inst.to_dict()}
            if (since := held.get(inst.key)) is not None:
                line["held_since"] = round(since, 3)
            yield ("\n" if first else ",\n") + json.dumps(line, sort_keys=True)
            first = False
    yield "\n]}\n"


def source_of(url: RegistryURL) -> str:
    """What names a registry in the file: its scheme, prefix and layout (a state dir pointed at
    another prefix within ``MAX_AGE_S`` would take its catalog for a wipe). Not its members:
    a fleet that changes them by restarting its watchers would lose every seed at once."""
    layout = f"?format=nerve&path={url.path or ''}" if url.nerve else ""
    return f"{url.scheme}://{url.prefix}{layout}"


@dataclass(frozen=True)
class Recalled:
    """What :func:`recall` found: the instances to seed, and since when each one held was."""

    instances: list[Instance] = field(default_factory=list)
    held: dict[Key, float] = field(default_factory=dict)  # wall clock


def recall(path: Path, source: str = "", follows: Callable[[str], bool] = lambda service: True,
           max_age: float = MAX_AGE_S, hold: float = 45.0) -> Recalled:
    """The up instances at ``path`` of the services ``follows`` names, but those held for over
    twice ``hold`` already; none when the file is missing, older than ``max_age``, of another
    registry than ``source`` or unusable (one warning naming it and why)."""
    out, held, now = Recalled(), dict[Key, float](), time.time()
    for left in path.parent.glob(f".{path.name}.*.tmp"):  # a write a SIGKILL cut short
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > 60:  # (not one being written now)
                left.unlink()
    try:
        age = time.time() - path.stat().st_mtime
        if age > max_age:
            log.info("%s: %.0f s old (over %.0f s): not used", path, age, max_age)
            return Recalled()
        with path.open("rb") as f:
            header = f.readline().strip()
            if header != _header(source).encode():
                if header.startswith(b'{"registry": ') and header.endswith(b'"instances": ['):
                    log.info("%s: another registry's catalog: not used", path)
                    return Recalled()
                raise ValueError("not a file of the last catalog")
            for n, line in enumerate(f, 2):
                if line.strip() == b"]}":
                    break
                data = json.loads(line.rstrip(b",\n"))
                if not isinstance(data, dict):
                    raise ValueError(f"line {n}: not a JSON object")
                inst = Instance.from_dict(data.get("instance"), f"line {n}")
                since = data.get("held_since")
                if since is not None and not isinstance(since, int | float):
                    raise ValueError(f"line {n}: held_since must be a number")
                if inst.state is not State.UP or not follows(inst.service) or (
                        since is not None and now - since > 2 * hold):
                    continue  # (held long enough already: gone)
                out.instances.append(inst)
                if since is not None:
                    held[inst.key] = float(since)
            else:
                raise ValueError("cut short")
    except FileNotFoundError:
        return Recalled()
    except (OSError, ValueError, KeyError, TypeError, InvalidRecord) as exc:
        log.warning("%s: not used: %s", path, exc)
        return Recalled()
    return Recalled(out.instances, held)
