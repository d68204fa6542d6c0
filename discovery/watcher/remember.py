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
start); touched only while the registry is connected (a catalog kept through an outage is
not the registry's); without what the guard holds (a watcher restarting every minute through
a real loss would hold the dead instances again at each start, past ``hold``); naming its
registry (scheme, members, prefix, layout). At the first read (not at the start: a registry
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
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

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
    (connected: a catalog kept through an outage is not made current by a touch);
    ``left_out()``: keys to leave out, those the wipe guard holds (else a watcher restarting
    every minute through a real loss held the dead instances again at each start)."""

    def __init__(self, path: Path, catalog: Catalog, *, source: str = "",
                 current: Callable[[], bool] = lambda: True,
                 left_out: Callable[[], Collection[Key]] = frozenset,
                 every: float = EVERY_S) -> None:
        self.path = path
        self.catalog = catalog
        self.source, self._current, self._left_out = source, current, left_out
        self.every = every
        self.error: str | None = None  # why the last write failed
        self._cond = threading.Condition()
        self._dirty = False
        self._closed = False
        self._gap = MIN_GAP_S  # the least time between two writes (from the last one's cost)
        self._last = -float("inf")  # monotonic time of the last write or touch
        self._thread: threading.Thread | None = None

    def changed(self) -> None:
        """The catalog changed: written within ``every`` seconds. Returns at once."""
        with self._cond:
            if self._closed:
                return
            self._dirty = True
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
                    wait = self._last + min(self.every, self._gap if self._dirty
                                            else self.every) - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                dirty, closing, self._dirty = self._dirty, self._closed, False
            started = time.monotonic()
            if dirty or not self._touch():
                written = self.write()  # (a failure: tried again ``every`` later, not at once)
                self._gap = self.every if not written else min(
                    self.every, max(MIN_GAP_S, COST * (time.monotonic() - started)))
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
        left_out = self._left_out()
        kept = [i for i in self.catalog.instances() if i.key not in left_out]
        try:  # staged, then renamed: never read back to compare (install() would: two copies
            staged = stage(_pieces(kept, self.source), self.path)  # of a 4.5 MB file,
            try:  # and glibc keeps the heap they grew: +3.4 MB in bench/footprint.py)
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


def _pieces(instances: list[Instance], source: str) -> Iterator[str]:
    """``{"registry": source, "instances": [...]}``, one instance a line (no one reads it but
    :func:`recall`, which parses it a line at a time)."""
    yield _header(source)
    first = True
    for inst in instances:
        if inst.state is State.UP:
            yield ("\n" if first else ",\n") + json.dumps(inst.to_dict(), sort_keys=True)
            first = False
    yield "\n]}\n"


def source_of(url: RegistryURL) -> str:
    """What names a registry in the file: its scheme, members, prefix and layout (a state dir
    pointed at another registry within ``MAX_AGE_S`` would take its catalog for a wipe)."""
    hosts = ",".join(sorted(f"{h}:{p}" for h, p in url.hosts))
    return f"{url.scheme}://{hosts}{url.prefix}{'?format=nerve' if url.nerve else ''}"


def recall(path: Path, source: str = "", follows: Callable[[str], bool] = lambda service: True,
           max_age: float = MAX_AGE_S) -> list[Instance]:
    """The up instances at ``path`` of the services ``follows`` names; none when the file is
    missing, older than ``max_age``, of another registry than ``source`` or unusable (one
    warning naming it and why)."""
    out: list[Instance] = []
    for left in path.parent.glob(f".{path.name}.*.tmp"):  # a write a SIGKILL cut short
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > 60:  # (not one being written now)
                left.unlink()
    try:
        age = time.time() - path.stat().st_mtime
        if age > max_age:
            log.info("%s: %.0f s old (over %.0f s): not used", path, age, max_age)
            return []
        with path.open("rb") as f:
            header = f.readline().strip()
            if header != _header(source).encode():
                if header.startswith(b'{"registry": ') and header.endswith(b'"instances": ['):
                    log.info("%s: another registry's catalog: not used", path)
                    return []
                raise ValueError("not a file of the last catalog")
            for n, line in enumerate(f, 2):
                if line.strip() == b"]}":
                    break
                inst = Instance.from_dict(json.loads(line.rstrip(b",\n")), f"line {n}")
                if inst.state is State.UP and follows(inst.service):
                    out.append(inst)
            else:
                raise ValueError("cut short")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, InvalidRecord) as exc:
        log.warning("%s: not used: %s", path, exc)
        return []
    return out
