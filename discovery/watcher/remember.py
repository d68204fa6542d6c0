"""The last catalog on disk, so that a watcher restarted during a registry-side wipe sees it.

The wipe guard (:mod:`discovery.watcher.guard`) tells a wipe by what a burst of removals takes
from the catalog the watcher holds. A watcher that starts while the registry is wiped (the
prefix deleted, every lease revoked, an empty backup restored; its agents not back yet) holds
nothing to compare its first read with: before, it took the empty registry as it was, and
converged the HAProxy it adopted to that, so its host routed nothing until the agents wrote
their instances back. A fleet whose watchers restart then (an upgrade rolling out, a crash
that the same registry value causes everywhere) blacks out host after host.

So the watcher keeps what is *up* in its catalog in ``<state dir>/catalog.last.json``, written
by a thread of its own at most every :data:`EVERY_S` seconds while the catalog changes, and
once more when it stops. At start, a file younger than :data:`MAX_AGE_S` seeds the catalog
(:meth:`~discovery.model.catalog.Catalog.seed`: nothing answers from it), and the first read
comes to the guard as a resync of that catalog: a wipe is held as it is on a watcher that ran
through it. An older file is not used (a host away that long finds its fleet changed, and a
guard that took the change for a wipe would route to instances long gone). The file is a
hint: one that cannot be read or parsed is named in one warning and not used.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from discovery.errors import InvalidRecord
from discovery.files import stage
from discovery.model import Instance, State
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

FILE = "catalog.last.json"
#: at most one write in this many seconds while the catalog changes (the whole catalog's up
#: instances: 4.5 MB and 0.1 s for 10,000 of them; every host of a fleet writing that at
#: every change anywhere would keep disks busy for nothing)
EVERY_S = 30.0
#: a file older than this is not used: what it names has had time to change for good
MAX_AGE_S = 600.0


class Remember:
    """Keeps ``catalog``'s up instances at ``path``: :meth:`changed` after each sync,
    :meth:`close` once (a last write if anything changed since the one before)."""

    def __init__(self, path: Path, catalog: Catalog, every: float = EVERY_S) -> None:
        self.path = path
        self.catalog = catalog
        self.every = every
        self.error: str | None = None  # why the last write failed
        self._cond = threading.Condition()
        self._dirty = False
        self._closed = False
        self._last = -float("inf")  # monotonic time of the last write
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
        """Write what changed since the last write (now, not ``every`` later), then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closed)
                self._cond.wait_for(lambda: self._closed,
                                    self._last + self.every - time.monotonic())
                if not self._dirty:
                    return  # closed, everything written
                self._dirty = False
                closing = self._closed
            self._last = time.monotonic()
            self.write()
            if closing:
                return

    def write(self) -> None:
        """Write the file now (a failure: logged, tried again at the next change)."""
        try:  # staged, then renamed: never read back to compare (install() would: two copies
            staged = stage(_pieces(self.catalog.instances()), self.path)  # of a 4.5 MB file,
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
        else:
            self.error = None


def _pieces(instances: list[Instance]) -> Iterator[str]:
    """``{"instances": [...]}``, one instance a line (no one reads it but :func:`recall`,
    which parses it a line at a time)."""
    yield '{"instances": ['
    first = True
    for inst in instances:
        if inst.state is State.UP:
            yield ("\n" if first else ",\n") + json.dumps(inst.to_dict(), sort_keys=True)
            first = False
    yield "\n]}\n"


def recall(path: Path, follows: Callable[[str], bool] = lambda service: True,
           max_age: float = MAX_AGE_S) -> list[Instance]:
    """The up instances at ``path`` of the services ``follows`` names; none when the file is
    missing, older than ``max_age`` or unusable (one warning naming it and why)."""
    out: list[Instance] = []
    try:
        age = time.time() - path.stat().st_mtime
        if age > max_age:
            log.info("%s: %.0f s old (over %.0f s): not used", path, age, max_age)
            return []
        with path.open("rb") as f:
            if f.readline().strip() != b'{"instances": [':
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
