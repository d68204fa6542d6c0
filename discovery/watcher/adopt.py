"""An HAProxy that outlives its watcher: finding it, adopting it, taking its sockets over.

A watcher that starts on a state dir whose HAProxy still runs (left by a SIGKILLed watcher, by
one stopped with SIGUSR2 for an upgrade, or by another container on the same volume) never
stops it and never starts a second one beside it blindly:

* :func:`survey` finds it through the state dir: the pid file names the master, checked
  against its ``/proc`` command line (our master socket) and asked through the master CLI
  (``show proc``); failing that, a worker still answering on the admin socket.
* Same pid namespace and same binary (``/proc/<pid>/exe``): it is **adopted** — supervised
  by its pid (a pidfd), its servers compared with the slot tables (``show servers state``,
  :func:`converge`) and put right through the runtime API; it is reloaded through the master
  CLI only when the installed config differs from the one it runs in more than what the
  runtime API sets (:func:`structure`, :func:`loaded_digest`).
* Otherwise (another binary, a master in another container, workers without a master) a new
  master is started with ``-x <admin socket>``: it takes the listening sockets over from the
  running worker (the template's ``expose-fd listeners``) and the old processes are then
  soft-stopped (SIGUSR1: they stop accepting, finish what they serve, and exit).

Ownership is written to ``haproxy.owner`` once the new watcher drives HAProxy. A watcher that
sees another's claim there stops driving HAProxy (:func:`claimed_by_other`); if its master was
not adopted by the claimant it soft-stops it — that is how a container hands over to its
successor across PID namespaces, where neither can signal the other's processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from discovery.errors import HAProxyError
from discovery.files import write_atomic
from discovery.watcher.haproxy import HAProxyMaster, HAProxyRuntime
from discovery.watcher.slots import Slot

log = logging.getLogger(__name__)

OWNER_FILE = "haproxy.owner"
LOADED_FILE = "haproxy.cfg.loaded"


def _ns() -> str:
    """This process's pid namespace (``pid:[4026531836]``): pids mean something only in it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has finished: nobody here may reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parent(pid: int) -> int | None:
    """The parent pid of ``pid`` (``/proc/<pid>/stat``), None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def exe(pid: int) -> str | None:
    """``/proc/<pid>/exe`` (``… (deleted)`` once the file was replaced); None: unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def binary_path(binary: str) -> str:
    return os.path.realpath(shutil.which(binary) or binary)


def ours(pid: int, master_socket: Path) -> bool:
    """``pid`` is an HAProxy of this state dir (its command line names our master socket)."""
    args = cmdline(pid)
    return bool(args) and any(a.startswith(f"{master_socket},") or a == str(master_socket)
                              for a in args)


@dataclass(frozen=True)
class Found:
    """An HAProxy running on a state dir. ``master``: its pid when visible here (same pid
    namespace, checked); ``workers``: current worker pids visible here."""

    master: int | None
    workers: tuple[int, ...]

    def visible(self) -> list[int]:
        return [p for p in (self.master, *self.workers) if p is not None]


def survey(pid_file: Path, master_socket: Path, admin_socket: Path) -> Found | None:
    """What runs on this state dir, or None when nothing answers there. The master is the
    pid file's, else the parent of the worker that answers on the admin socket (a pid file
    not written yet or lost: the master was taken for gone, and its HAProxy taken over with
    ``-x`` instead of adopted; seen once in ``make test``)."""
    master: int | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().split()[0])
        if alive(pid) and ours(pid, master_socket):
            master = pid
    if master is None:
        try:
            worker = HAProxyRuntime(str(admin_socket), timeout=2.0).pid()
        except (HAProxyError, KeyError, ValueError):
            return None  # a stale socket file: nothing runs
        if not (alive(worker) and ours(worker, master_socket)):
            return Found(None, ())
        up = parent(worker)
        if up is None or not (alive(up) and ours(up, master_socket)):
            return Found(None, (worker,))  # workers without their master
        master = up
    try:
        proc = HAProxyMaster(str(master_socket), timeout=2.0, connect_grace=1.0).show_proc()
        return Found(master, tuple(p.pid for p in proc.workers))
    except HAProxyError as exc:
        log.warning("HAProxy master %d left here does not answer (%s)", master, exc)
        return Found(master, ())


def soft_stop(pids: Sequence[int], master_socket: Path) -> list[int]:
    """SIGUSR1 to each pid that is still an HAProxy of ours: stop accepting, finish, exit."""
    done = []
    for pid in pids:
        if alive(pid) and ours(pid, master_socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                done.append(pid)
    return done


# ---- what the running master loaded ---------------------------------------------------------
def structure(text: str) -> str:
    """The config without what the runtime API sets: each ``server`` line keeps its name and
    options but not its address, ``weight``, ``disabled`` or comment."""
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "server":
            rest, skip = [], False
            for w in words[3:]:
                if skip:
                    skip = False
                elif w == "weight":
                    skip = True
                elif w != "disabled":
                    rest.append(w)
            line = " ".join(["server", words[1], *rest])
        out.append(line.rstrip())
    return "\n".join(out)


def digest(path: Path) -> str:
    """sha256 of the config's :func:`structure` ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return hashlib.sha256(structure(text).encode()).hexdigest()


def note_loaded(state_dir: Path, config: Path) -> None:
    """Remember which config the master now runs (after a start or a reload)."""
    write_atomic(state_dir / LOADED_FILE, digest(config) + "\n")


def loaded_digest(state_dir: Path) -> str:
    try:
        return (state_dir / LOADED_FILE).read_text().strip()
    except OSError:
        return ""


# ---- who drives HAProxy ---------------------------------------------------------------------
@dataclass(frozen=True)
class Owner:
    token: str
    ns: str
    master: int

    @staticmethod
    def read(state_dir: Path) -> Owner | None:
        try:
            data = json.loads((state_dir / OWNER_FILE).read_text())
            return Owner(str(data["token"]), str(data["ns"]), int(data["master"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def claim(state_dir: Path, master: int) -> str:
    """Write a new ownership token for this process, driving ``master``; return the token."""
    token = uuid.uuid4().hex
    write_atomic(state_dir / OWNER_FILE,
                 json.dumps({"token": token, "ns": _ns(), "master": master}) + "\n")
    return token


def claimed_by_other(state_dir: Path, token: str) -> Owner | None:
    """The other watcher's claim, when one replaced ours."""
    owner = Owner.read(state_dir)
    return owner if owner is not None and owner.token != token else None


def same_master(owner: Owner, master: int | None) -> bool:
    """The claimant adopted our master (same pid namespace, same pid): leave it alone."""
    return master is not None and owner.ns == _ns() and owner.master == master


# ---- bringing an adopted HAProxy to the slot tables ------------------------------------------
def converge(tables: Mapping[str, Sequence[Slot]], runtime: HAProxyRuntime) -> bool:
    """Compare ``show servers state`` with the slots; set what differs through the runtime API.

    Returns False (nothing sent) when the servers are not the same set — the running config is
    another structure and only a reload can fix that.
    """
    views = runtime.servers()
    wanted = {(backend, s.name): s for backend, slots in tables.items() for s in slots}
    if set(wanted) - set(views):
        return False
    changes: dict[str, list[Slot]] = {}
    for (backend, name), slot in wanted.items():
        if not views[(backend, name)].matches(slot):
            changes.setdefault(backend, []).append(slot)
    if changes:
        runtime.apply_slots(changes)
    log.info("adopted HAProxy brought to the catalog: %d of %d slots set",
             sum(len(v) for v in changes.values()), len(wanted))
    return True


# ---- waiting for a process without being its parent -----------------------------------------
class Watched:
    """A process watched through a pidfd: readable the moment it ends (child or not)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid, self.popen = pid, popen
        self.fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.fd = os.pidfd_open(pid)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return alive(self.pid)

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # one replaced (a start tried again): its pidfd goes with it,
        self.close()  # not while the monitor still selects on it (it holds a reference)


def wait_ended(proc: Watched, wake: int, timeout: float) -> bool:
    """Block until ``proc`` ends (True), the ``wake`` fd is readable, or ``timeout`` passes.
    Without a pidfd (old kernels) this is a plain wait of ``timeout``: the caller re-checks."""
    fds = [wake] + ([proc.fd] if proc.fd is not None else [])
    with contextlib.suppress(InterruptedError):
        select.select(fds, [], [], timeout)
    return not proc.alive()
