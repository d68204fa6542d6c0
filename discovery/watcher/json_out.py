"""``--json-out``: the catalog as one JSON file, written again after each sync that changed it.

The watcher's loop only names the services that changed (all of them after a reset); a thread
of its own serialises those again from the catalog, keeping every other service's part of the
file as it was, and writes the file in pieces, the newest catalog first: syncs that come while
it works make one write after it. Before, each sync serialised and wrote the whole catalog on
the loop, ahead of HAProxy's next update: 0.16 s at 10,000 instances and 2.0 s at 100,000, on
every host, for a change anywhere in the fleet. A round (serialise, write) starts no sooner
than ``PACE`` times as long as the last one took after it (at most ``PACE_MAX`` s): the file
is written whole, and at 100,000 instances (54 MB, 0.26 s a write) changes coming 20 a second
cost 80 % of a core, now at most a tenth; what comes meanwhile makes one write.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from discovery.files import write_atomic
from discovery.model import Instance
from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)
PACE, PACE_MAX = 10.0, 5.0


class JsonOut:
    def __init__(self, path: Path, catalog: Catalog) -> None:
        self.path = path
        self.catalog = catalog
        self.error: str | None = None  # why the last write failed
        self._parts: dict[str, str] = {}  # service -> its part of the file (the writer's own)
        self._cond = threading.Condition()
        self._dirty: set[str] | None = None  # services to serialise again; None: all
        self._again = False  # write even if nothing changed: the last write failed
        self._redo = False  # a serialisation raised: the next sync serialises everything
        self._written = False  # a first write made (an empty catalog is a file too)
        self._busy = False  # the writer has work
        self._closed = False
        self._thread: threading.Thread | None = None
        self._next = 0.0  # when the next round may start (monotonic): paced
        self._hurry = False  # stopping: what is pending is written without its pace

    def sync(self, changed: set[str] | None) -> None:
        """``changed``: the services changed since the last sync (None: any). Returns at once;
        a failed write is logged and tried again at the next sync."""
        with self._cond:
            if self._closed:
                return
            if changed is None or self._dirty is None or self._redo:
                self._dirty, self._redo = None, False
            else:
                self._dirty |= changed
            self._again |= self.error is not None
            if self._dirty is not None and not self._dirty and not self._again:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="json-out", daemon=True)
                self._thread.start()
            self._busy = True
            self._cond.notify_all()

    def flush(self, timeout: float | None = None, hurry: bool = False) -> bool:
        """Wait until what :meth:`sync` asked for is written (or failed): as long as that
        takes unless ``timeout`` (as the loop did when it wrote itself); False: timed out.
        ``hurry`` (stopping, or handing over): from now on no round waits out its pace."""
        with self._cond:
            if hurry:
                self._hurry = True
                self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._busy, timeout)

    def close(self) -> None:
        """Write what is pending (not waiting out the pace), then stop the writer."""
        self.flush(hurry=True)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._busy or self._closed)
                if not self._busy:
                    return
                self._cond.wait_for(lambda: self._hurry, self._next - time.monotonic())
                dirty, self._dirty = self._dirty, set()
                again, self._again = self._again, False
            start = time.monotonic()
            try:
                write = self._serialise(dirty) or again or not self._written
            except Exception as exc:  # a bug: the file stays as it was (never a part of it),
                self.error = f"--json-out {self.path}: cannot serialise the catalog: {exc}"
                log.exception("%s", self.error)  # and flush() and close() still return
                write = False
                with self._cond:  # what this round did not serialise: at the next sync (not
                    self._redo = True  # at once: the same bug would loop)
            if write:
                self._write()
            self._next = time.monotonic() + min(PACE * (time.monotonic() - start), PACE_MAX)
            with self._cond:
                if self._dirty is not None and not self._dirty and not self._again:
                    self._busy = False  # nothing more came meanwhile
                    self._cond.notify_all()

    def _serialise(self, dirty: set[str] | None) -> bool:
        """Serialise ``dirty`` (None: every service) again; True when the file must change."""
        if dirty is None:
            parts = {name: service_json(members)
                     for name, members in self.catalog.services().items()}
            moved, self._parts = parts != self._parts, parts
            return moved
        moved = False
        for name in dirty:
            members = self.catalog.instances(name)
            part = service_json(members) if members else None
            if part != self._parts.get(name):
                moved = True
                if part is None:
                    del self._parts[name]
                else:
                    self._parts[name] = part
        return moved

    def _write(self) -> None:
        try:
            write_atomic(self.path, catalog_json(self._parts), shared=True)  # others' tools
        except Exception as exc:  # a full disk, a folder gone: tried again at the next sync
            self.error = f"--json-out {self.path}: cannot write it: {exc}"
            log.error("%s", self.error, exc_info=not isinstance(exc, OSError))
        else:
            self.error, self._written = None, True


def service_json(members: list[Instance]) -> str:
    """One service's part of the file (its sorted instances), as it stands there: each
    service's part is kept and only what changed is serialised again (``indent`` makes
    ``json`` use its pure-Python encoder: 1.2 s for 100,000 instances)."""
    return json.dumps([i.to_dict() for i in members], indent=2,
                      sort_keys=True).replace("\n", "\n    ")  # JSON strings hold no newline


def catalog_json(parts: dict[str, str]) -> Iterator[str]:
    """The whole file (``{"services": {name: [instance, ...]}}``, as ``json.dumps`` with
    ``indent=2, sort_keys=True`` writes it), in pieces, from each service's
    :func:`service_json`."""
    if not parts:
        yield '{\n  "services": {}\n}\n'
        return
    yield '{\n  "services": {\n'
    for n, name in enumerate(sorted(parts)):
        yield (",\n" if n else "") + f"    {json.dumps(name)}: "
        yield parts[name]
    yield "\n  }\n}\n"
