"""Running, validating, installing and reloading HAProxy.

:class:`HAProxySupervisor` owns a master-worker HAProxy (``haproxy -W -S ...``): it starts one,
or adopts the one a previous watcher of the state dir left running (:mod:`.adopt`), reloads
it through the master CLI, restarts it the moment its master dies (a pidfd wakes the monitor;
when the master before died within ``stable_after`` seconds of its start too, only after a
wait doubling from 0.2 s to 10 s: an HAProxy that keeps crashing is not restarted in a loop),
and hands it over to a successor. :class:`ExternalHAProxy` drives an HAProxy that someone
else runs. Both offer ``runtime``, ``reload()``, ``reload_count()`` and ``stop()`` (the
:class:`HAProxyControl` protocol).

The config must declare the admin socket with ``expose-fd listeners``, e.g.
``stats socket <state_dir>/admin.sock mode 600 level admin expose-fd listeners``: on a
reload, and when a new master takes over with ``-x``, the new worker then takes the
listening sockets over and no connection is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from discovery.errors import HAProxyError, RenderError
from discovery.retry import RetryAt, backoff, poll
from discovery.watcher import adopt
from discovery.watcher.adopt import Found, Owner, Watched
from discovery.watcher.external import ExternalHAProxy, save_server_state, wait_worker
from discovery.watcher.haproxy import HAProxyMaster, HAProxyRuntime

__all__ = ["ExternalHAProxy", "HAProxyControl", "HAProxySupervisor", "save_server_state",
           "validate_config"]
log = logging.getLogger(__name__)


def validate_config(binary: str, path: str | Path, timeout: float = 20.0) -> None:
    """``haproxy -c -f path``; RenderError carrying HAProxy's own ALERT lines if invalid."""
    argv = [binary, "-c", "-f", str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"{path}: 'haproxy -c' took longer than {timeout:g}s") from exc
    except OSError as exc:  # missing, a directory, not executable
        raise HAProxyError(f"cannot run {binary!r}: {exc.strerror or exc}") from exc
    if proc.returncode == 0:
        return
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    alerts = [ln for ln in lines if ln.startswith("[ALERT]")] or lines[-5:]
    detail = "; ".join(_strip_prefix(ln) for ln in alerts) or f"exit code {proc.returncode}"
    raise RenderError(f"{path}: HAProxy rejects the config: {detail}")


def _strip_prefix(line: str) -> str:
    """'[ALERT]    (123) : config : [x.cfg:7] : msg' -> 'config : [x.cfg:7] : msg'."""
    head, sep, rest = line.partition(") : ")
    return rest if sep and head.startswith("[") else line


class HAProxyControl(Protocol):
    """What the watcher needs from an HAProxy, whoever runs it."""

    @property
    def runtime(self) -> HAProxyRuntime: ...

    def reload(self) -> None: ...

    def reload_count(self) -> int: ...

    def stop(self) -> None: ...


class _HandedOver(HAProxyRuntime):
    """The runtime API of an HAProxy another watcher now drives: every command is refused."""

    def _connect(self, what: str) -> object:  # type: ignore[override]
        raise HAProxyError(f"{what}: HAProxy was handed over to another watcher")


class HAProxySupervisor:
    """A master-worker HAProxy of one state dir: start or adopt, reload, stop or leave, restart.

    ``on_restart`` is called (from the monitor thread) after HAProxy was restarted because
    its master died: every runtime change is lost then and must be re-applied. ``on_adopt``
    is called when :meth:`start` adopted a running master whose config is the installed one:
    it brings the servers to the slot tables and returns False when only a reload can (see
    :func:`.adopt.converge`). With ``server_state_file`` (the config's ``server-state-file``),
    ``reload()`` first dumps the servers' state there, so the new worker starts from it.
    A master that dies within ``stable_after`` seconds of its start is a quick death: the first
    one in a row is restarted at once, each further one only after a wait doubling through
    ``crash_backoff`` (from 0.2 s to 10 s); a master that lasted that long starts it over.
    :meth:`stop` soft-stops HAProxy (SIGUSR1: it finishes what it serves, at most
    ``soft_stop_timeout`` seconds, then SIGTERM); :meth:`leave` leaves it serving.
    """

    def __init__(self, config: Path, state_dir: Path, binary: str = "haproxy", *,
                 on_restart: Callable[[], None] | None = None,
                 on_adopt: Callable[[], bool] | None = None, start_timeout: float = 15.0,
                 backoff: tuple[float, float] = (0.2, 10.0),
                 server_state_file: Path | None = None, soft_stop_timeout: float = 3.0,
                 crash_backoff: tuple[float, float] = (0.2, 10.0), stable_after: float = 30.0
                 ) -> None:
        self.config, self.state_dir, self.binary = Path(config), Path(state_dir), binary
        self.on_restart, self.on_adopt = on_restart, on_adopt
        self.start_timeout, self.soft_stop_timeout = start_timeout, soft_stop_timeout
        self.backoff, self.stable_after = backoff, stable_after
        self._crashes = RetryAt(*crash_backoff)  # quick deaths in a row: the wait to restart
        self._started = time.monotonic()  # when the current master was started or adopted
        self.server_state_file = server_state_file
        self.admin_socket = self.state_dir / "admin.sock"
        self.master_socket = self.state_dir / "master.sock"
        self.pid_file = self.state_dir / "haproxy.pid"
        self.log_file = self.state_dir / "haproxy.log"
        self.runtime = HAProxyRuntime(str(self.admin_socket))
        self.master = HAProxyMaster(str(self.master_socket))
        self.restarts = 0
        self.adopted = False  # the running master was left by an earlier watcher
        self.handed_over: Owner | None = None  # another watcher drives HAProxy now
        self.last_restart_ms: float | None = None  # master death -> new worker ready
        self._proc: Watched | None = None
        self._token = ""
        self._left = False
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._monitor: threading.Thread | None = None

    @property
    def master_pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.alive() else None

    @property
    def running(self) -> bool:
        return self.handed_over is None and self.master_pid is not None

    # ---- start: adopt what runs, or start (taking the sockets over) ---------------------------
    def nothing_here(self) -> bool:
        """Whether no HAProxy runs on the state dir, to adopt or to take over: a start would
        be a new one's."""
        return (not self.running
                and adopt.survey(self.pid_file, self.master_socket, self.admin_socket) is None)

    def start(self, validated: bool = False) -> None:
        """Adopt the HAProxy running on the state dir, or start one; return once it serves.
        Unless ``validated``, the config is checked first (``haproxy -c``) when an HAProxy runs
        there; a new one checks it itself as it starts (one parse fewer: ~0.2 s at 1,000
        services), and a config it refuses raises the check's own RenderError."""
        with self._lock:
            if self.handed_over is not None:
                raise HAProxyError("HAProxy was handed over to another watcher")
            if self.running:
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            found = adopt.survey(self.pid_file, self.master_socket, self.admin_socket)
            if not validated and found is not None:
                validate_config(self.binary, self.config)
            self._stopping.clear()  # (not _left: a SIGUSR2 during a start still leaves it)
            try:
                if found is not None and found.master is not None and found.workers \
                        and adopt.exe(found.master) == adopt.binary_path(self.binary):
                    self._adopt(found.master)
                else:
                    self._spawn(found, checked=validated or found is not None)
            finally:  # (adopted, but its catch-up reload failed: watched all the same)
                if self.running and (self._monitor is None or not self._monitor.is_alive()):
                    self._monitor = threading.Thread(
                        target=self._watch, daemon=True,
                        name=f"haproxy-monitor-{self.state_dir.name}")
                    self._monitor.start()

    def _adopt(self, pid: int) -> None:
        self._proc, self.adopted, self._started = Watched(pid), True, time.monotonic()
        self._token = adopt.claim(self.state_dir, pid)
        log.warning("adopted HAProxy master %d left running on %s by an earlier watcher",
                    pid, self.state_dir)
        if adopt.loaded_digest(self.state_dir) != adopt.digest(self.config):
            log.info("the adopted HAProxy runs another config than %s: reloading", self.config)
            self.reload()
            return
        try:
            converged = self.on_adopt() if self.on_adopt is not None else True
        except HAProxyError as exc:
            log.warning("adopted HAProxy: %s; reloading", exc)
            converged = False
        if not converged:
            self.reload()

    def _spawn(self, takeover: Found | None, checked: bool = True) -> None:
        """Start a master; with ``takeover`` (an HAProxy already serving here) take its
        listening sockets with ``-x`` and soft-stop it once ours serves. Not ``checked``: a
        start that fails is asked why of ``haproxy -c`` (its RenderError, if the config)."""
        argv = [self.binary, "-W", "-S", f"{self.master_socket},mode,600",
                "-f", str(self.config), "-p", str(self.pid_file)]
        if takeover is not None:
            argv += ["-x", str(self.admin_socket)]
        with open(self.log_file, "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._proc, self.adopted = Watched(popen.pid, popen), False
        self._started = time.monotonic()
        log.info("started HAProxy master pid %d: %s", popen.pid, " ".join(argv))
        try:
            self._wait_ready(popen)
        except HAProxyError:
            self._terminate(popen.pid, popen, soft=0.0, timeout=5.0)
            if not checked:
                validate_config(self.binary, self.config)
            raise
        adopt.note_loaded(self.state_dir, self.config)
        self._token = adopt.claim(self.state_dir, popen.pid)  # an old watcher now lets go
        if takeover is not None:
            stopped = adopt.soft_stop(takeover.visible(), self.master_socket)
            log.warning("took the listening sockets over from the HAProxy running on %s; "
                        "soft-stopping its processes %s", self.state_dir,
                        stopped or "(not visible here: its watcher lets go)")

    def _wait_ready(self, popen: subprocess.Popen[bytes]) -> None:
        """Ready: a worker of our master answers on the admin socket (its listeners are open
        then). Only the admin socket is asked: during a takeover it may be shared with the old
        worker (``-x`` hands it over too), whose answers do not count."""
        started = time.monotonic()
        last: list[object] = ["no answer yet"]

        def ready() -> bool:
            if popen.poll() is not None:
                raise HAProxyError(f"HAProxy exited with code {popen.returncode} at start: "
                                   f"{self.log_tail()}")
            try:
                pid = self.runtime.pid()
            except (HAProxyError, KeyError, ValueError) as exc:
                last[0] = exc
                return False
            last[0] = f"pid {pid} answered, not a worker of master {popen.pid}"
            return adopt.parent(pid) == popen.pid

        if not poll(ready, timeout=self.start_timeout, interval=0.005):
            raise HAProxyError(f"HAProxy not ready within {self.start_timeout:g}s ({last[0]}): "
                               f"{self.log_tail(3)}")
        log.debug("HAProxy ready in %.0f ms", (time.monotonic() - started) * 1000)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in text.splitlines()[-lines:])

    # ---- reload ----------------------------------------------------------------------------
    def reload(self, timeout: float = 15.0) -> None:
        """Seamless reload through the master CLI; returns once the new worker answers."""
        with self._lock:
            if not self.running:
                raise HAProxyError("reload: HAProxy is not running")
            started = time.monotonic()
            if self.server_state_file is not None:
                save_server_state(self.runtime, self.server_state_file)
            try:
                proc = self.master.reload(timeout)
            except HAProxyError as exc:
                raise HAProxyError(f"{exc} | {self.log_tail(5)}") from exc
            adopt.note_loaded(self.state_dir, self.config)
            new = {p.pid for p in proc.workers}
            wait_worker(self.runtime, new.__contains__,
                        max(0.5, timeout - (time.monotonic() - started)))
            log.info("HAProxy reloaded in %.0f ms (reload #%d)",
                     (time.monotonic() - started) * 1000, proc.master.reloads)

    def reload_count(self) -> int:
        """The current master's reload counter (``show proc``; restarts from 0 on restart)."""
        return self.master.reload_count()

    # ---- stop, leave, hand over ------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Stop monitoring, then soft-stop the master (by its pid): SIGUSR1, SIGTERM after
        ``soft_stop_timeout``, SIGKILL after ``timeout``. After :meth:`leave`, or once handed
        over to a watcher that adopted it, HAProxy is left running."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._lock:
            proc = self._proc
            owner = self.handed_over
            keep = self._left or (owner is not None and adopt.same_master(
                owner, proc.pid if proc is not None else None))
            if proc is not None and not keep:
                self._terminate(proc.pid, proc.popen, self.soft_stop_timeout, timeout)
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout)

    def leave(self) -> None:
        """Stop supervising and leave HAProxy serving for a successor (signal-handler safe)."""
        self._left = True
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _terminate(self, pid: int, popen: subprocess.Popen[bytes] | None, soft: float,
                   timeout: float) -> None:
        def gone() -> bool:
            return popen.poll() is not None if popen is not None else not adopt.alive(pid)

        for sig, wait in ((signal.SIGUSR1, soft), (signal.SIGTERM, timeout),
                          (signal.SIGKILL, timeout)):
            if gone():
                return
            if sig == signal.SIGKILL:
                log.warning("HAProxy master %d ignored SIGTERM; killing it", pid)
            if wait > 0 or sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                poll(gone, timeout=wait, interval=0.02)

    def _handed_over(self) -> bool:
        """Another watcher claimed this state dir: let go of HAProxy (soft-stopping our master
        unless that watcher adopted it)."""
        owner = adopt.claimed_by_other(self.state_dir, self._token) if self._token else None
        if owner is None:
            return False
        with self._lock:
            self.handed_over = owner
            self.runtime = _HandedOver(str(self.admin_socket))
            pid = self.master_pid
            if pid is None or adopt.same_master(owner, pid):
                log.warning("another watcher now drives the HAProxy of %s (master %s): "
                            "letting go of it", self.state_dir, pid)
            else:
                log.warning("another watcher took the HAProxy of %s over: soft-stopping our "
                            "master %d, no longer driving HAProxy", self.state_dir, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
        return True

    # ---- monitor ---------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                self._stopping.wait(0.25)
                continue
            ended = adopt.wait_ended(proc, self._wake_r, 0.25)
            if self._stopping.is_set() or self._handed_over():
                return
            if ended and self._proc is proc:
                self._restart(proc)

    def _restart(self, dead: Watched) -> None:
        died = time.monotonic()
        lived = died - self._started
        wait = 0.0  # a long-lived master's death, or the first quick one in a row: at once
        if lived < self.stable_after:
            wait = self._crashes.wait
            self._crashes.failed()
        else:
            self._crashes.succeeded()
        if wait:
            log.warning("HAProxy master %d died (exit %s) %.1f s after its start, as the one "
                        "before; restarting it in %.1f s", dead.pid, dead.returncode(), lived,
                        wait)
        else:
            log.warning("HAProxy master %d died (exit %s); restarting it", dead.pid,
                        dead.returncode())
        dead.close()
        if wait and (self._stopping.wait(wait) or self._handed_over()):
            return  # stopped, left or handed over meanwhile: nothing to restart
        restarted = False
        try:
            for attempt in backoff((HAProxyError, OSError), stop_event=self._stopping,
                                   initial=self.backoff[0], maximum=self.backoff[1],
                                   what="restarting HAProxy", logger=log):
                with attempt, self._lock:
                    if self._stopping.is_set() or self._proc is not dead:
                        break
                    self._spawn(adopt.survey(self.pid_file, self.master_socket,
                                             self.admin_socket))
                    self.restarts += 1
                    restarted = True
        except (HAProxyError, OSError):
            return  # only when stopping: backoff() never gives up otherwise
        if restarted:
            self.last_restart_ms = (time.monotonic() - died) * 1000
            log.info("HAProxy serving again %.0f ms after its master died",
                     self.last_restart_ms)
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception:
                    log.exception("on_restart callback failed")
