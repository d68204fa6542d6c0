"""Writing files so that a reader never sees half of one: stage, then install (confd's chain).

:func:`stage` writes the new bytes to a temporary file in the destination's folder (fsynced);
the caller may check it there (``haproxy -c -f STAGED``); :func:`install` then renames it over
the destination, or writes in place where a rename is refused (a bind-mounted single file).
:func:`write_atomic` is both at once, for files nobody needs to check first.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: a rename onto the destination refused with these: write into it in place instead
_FALLBACK_ERRNOS = {errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES}


def stage(text: str | Iterable[str], dest: Path, shared: bool = False) -> Path:
    """Write ``text`` (or its pieces, one after another: a large file is not built as one
    string first) to a temporary file next to ``dest`` (same folder), fsynced; nothing is left
    behind when that fails (a full disk). It is private (0600) unless ``shared``:
    then what a new file gets under the process's umask (a ``--json-out`` other users read);
    :func:`install` gives it the mode of the file it replaces."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as f:
            if shared:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            if isinstance(text, str):
                f.write(text)
            else:
                f.writelines(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


@functools.cache
def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread); read
    once, at the first shared write (not at import: most processes never make one)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def install(staged: Path, dest: Path) -> bool:
    """Put ``staged`` (a file in dest's folder) in place of ``dest``, confd style.

    Returns False (and removes ``staged``) when ``dest`` already has the same bytes.
    Otherwise ``os.replace`` (atomic); when the rename is refused (EBUSY/EXDEV/EPERM/
    EACCES: ``dest`` is a bind-mounted single file, another file system, ...) the bytes
    are written into ``dest`` in place (over its blocks, then cut to size, fsync; the old bytes
    back if that fails). Returns True.
    """
    data, old = staged.read_bytes(), None
    try:
        if (old := dest.read_bytes()) == data:
            staged.unlink()
            return False
        mode: int | None = dest.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    try:
        if mode is not None:
            os.chmod(staged, mode)
        os.replace(staged, dest)
    except OSError as exc:
        if exc.errno not in _FALLBACK_ERRNOS:
            raise
        log.info("rename onto %s refused (%s); writing in place", dest, exc.strerror)
        _in_place(dest, data, old)
        staged.unlink(missing_ok=True)
        return True
    with contextlib.suppress(OSError):
        dirfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    return True


def _in_place(dest: Path, data: bytes, old: bytes | None) -> None:
    """``data`` written into ``dest`` over its own blocks, never truncated first: when the disk
    cannot take the rest (a larger file), ``old`` is put back, which fits in the blocks it had
    (truncating first left a partial file for a restart to load)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            _write_at_start(fd, data)
            os.fsync(fd)
        except OSError:
            if old is not None:
                _write_at_start(fd, old)
            raise
    finally:
        os.close(fd)


def _write_at_start(fd: int, data: bytes) -> None:
    view, at = memoryview(data), 0
    while at < len(data):
        at += os.pwrite(fd, view[at:], at)
    os.ftruncate(fd, len(data))


def write_atomic(path: Path, text: str | Iterable[str], shared: bool = False) -> bool:
    """Put ``text`` (or its pieces) at ``path`` atomically (creating its folder); False when it
    was already there byte for byte (nothing written). ``shared``: see :func:`stage`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = stage(text, path, shared)
    try:
        return install(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
