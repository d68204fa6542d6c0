"""Running, validating, installing and reloading HAProxy.

:class:`HAProxySupervisor` owns a master-worker HAProxy (``haproxy -W -S ...``) as a child
process, reloads it through the master CLI and restarts it if the master dies.
:class:`ExternalHAProxy` drives an HAProxy that someone else runs. Both offer ``runtime``,
``reload()``, ``reload_count()`` and ``stop()`` (the :class:`HAProxyControl` protocol).

The config must declare the admin socket with ``expose-fd listeners``, e.g.
``stats socket <state_dir>/admin.sock mode 600 level admin expose-fd listeners``: on a
reload the new worker then takes the listening sockets over and no connection is refused.
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
from discovery.files import write_atomic
from discovery.retry import backoff, poll
from discovery.watcher.haproxy import HAProxyMaster, HAProxyRuntime

log = logging.getLogger(__name__)

def validate_config(binary: str, path: str | Path, timeout: float = 20.0) -> None:
    """``haproxy -c -f path``; RenderError carrying HAProxy's own ALERT lines if invalid."""
    argv = [binary, "-c", "-f", str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as exc:
        raise HAProxyError(f"cannot run {binary!r}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"{path}: 'haproxy -c' took longer than {timeout:g}s") from exc
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


def save_server_state(runtime: HAProxyRuntime, path: Path) -> None:
    """Dump ``show servers state`` to ``path`` atomically (for ``server-state-file``).

    HAProxy 2.6 restores admin state, weight and port from it at a reload, but the
    address only for servers whose config line names a host (``localhost:1``), not an IP.
    """
    write_atomic(path, runtime.command("show servers state"))


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` is gone (or a zombie: not our child, nobody reaps it here)."""

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True

    return poll(gone, timeout=timeout, interval=0.05)


class HAProxyControl(Protocol):
    """What the watcher needs from an HAProxy, whoever runs it."""

    @property
    def runtime(self) -> HAProxyRuntime: ...

    def reload(self) -> None: ...

    def reload_count(self) -> int: ...

    def stop(self) -> None: ...


def _wait_worker(runtime: HAProxyRuntime, ok: Callable[[int], bool], timeout: float) -> int:
    """Poll ``show info`` on the admin socket until the answering pid satisfies ``ok``."""
    last: list[object] = [None]

    def answered() -> int | None:
        try:
            pid = runtime.pid()
        except (HAProxyError, KeyError, ValueError) as exc:
            last[0] = exc
            return None
        last[0] = f"pid {pid}"
        return pid if ok(pid) else None

    pid = poll(answered, timeout=timeout)
    if pid is None:
        raise HAProxyError(f"{runtime.socket_path}: no new worker answered within "
                           f"{timeout:g}s (last: {last[0]})")
    return pid


class HAProxySupervisor:
    """A master-worker HAProxy run as our child: start, reload, stop, restart on death.

    ``on_restart`` is called (from the monitor thread) after HAProxy was restarted because
    its master died: every runtime change is lost then and must be re-applied. With
    ``server_state_file`` (the config's ``server-state-file``), ``reload()`` first dumps
    the servers' state there, so the new worker starts from it.
    """

    def __init__(self, config: Path, state_dir: Path, binary: str = "haproxy", *,
                 on_restart: Callable[[], None] | None = None, start_timeout: float = 15.0,
                 backoff: tuple[float, float] = (0.2, 10.0),
                 server_state_file: Path | None = None) -> None:
        self.config, self.state_dir, self.binary = Path(config), Path(state_dir), binary
        self.on_restart = on_restart
        self.start_timeout = start_timeout
        self.backoff = backoff
        self.server_state_file = server_state_file
        self.admin_socket = self.state_dir / "admin.sock"
        self.master_socket = self.state_dir / "master.sock"
        self.pid_file = self.state_dir / "haproxy.pid"
        self.log_file = self.state_dir / "haproxy.log"
        self.runtime = HAProxyRuntime(str(self.admin_socket))
        self.master = HAProxyMaster(str(self.master_socket))
        self.restarts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def master_pid(self) -> int | None:
        p = self._popen
        return p.pid if p is not None and p.poll() is None else None

    @property
    def running(self) -> bool:
        return self.master_pid is not None

    def start(self, validated: bool = False) -> None:
        """Validate the config (unless the caller just did), start HAProxy, wait until both
        sockets answer."""
        with self._lock:
            if self.running:
                return
            if not validated:
                validate_config(self.binary, self.config)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._stopping.clear()
            self._spawn()
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = threading.Thread(target=self._watch, daemon=True,
                                                 name=f"haproxy-monitor-{self.state_dir.name}")
                self._monitor.start()

    def _stop_stale(self) -> None:
        """A master left by an earlier watcher of this state dir that was SIGKILLed (HAProxy runs
        in its own session and outlives it): stop it, by its pid, before starting ours —
        otherwise two HAProxies would listen on the same ports with different membership."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if not cmdline or Path(cmdline[0].decode(errors="replace")).name != Path(self.binary).name \
                or str(self.master_socket).encode() not in b" ".join(cmdline):
            return  # not ours: a recycled pid, or another HAProxy
        log.warning("stopping HAProxy pid %d left by an earlier watcher of %s", pid,
                    self.state_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10.0):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)

    def _spawn(self) -> None:
        self._stop_stale()
        argv = [self.binary, "-W", "-S", f"{self.master_socket},mode,600",
                "-f", str(self.config), "-p", str(self.pid_file)]
        with open(self.log_file, "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._popen = popen
        log.info("started HAProxy master pid %d: %s", popen.pid, " ".join(argv))
        deadline = time.monotonic() + self.start_timeout
        probe = HAProxyMaster(str(self.master_socket), connect_grace=0.0)
        try:
            while True:
                if popen.poll() is not None:
                    raise HAProxyError(f"HAProxy exited with code {popen.returncode} at start: "
                                       f"{self.log_tail()}")
                try:
                    workers = probe.worker_pids()
                    if workers:
                        _wait_worker(self.runtime, set(workers).__contains__,
                                     max(0.1, deadline - time.monotonic()))
                        return
                except HAProxyError:
                    if time.monotonic() >= deadline:
                        raise
                if time.monotonic() >= deadline:
                    raise HAProxyError(f"HAProxy not ready within {self.start_timeout:g}s")
                time.sleep(0.02)
        except HAProxyError:
            self._kill(popen, timeout=5.0)
            raise

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in text.splitlines()[-lines:])

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
            new = {p.pid for p in proc.workers}
            _wait_worker(self.runtime, new.__contains__,
                         max(0.5, timeout - (time.monotonic() - started)))
            log.info("HAProxy reloaded in %.0f ms (reload #%d)",
                     (time.monotonic() - started) * 1000, proc.master.reloads)

    def reload_count(self) -> int:
        """The current master's reload counter (``show proc``; restarts from 0 on restart)."""
        return self.master.reload_count()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop monitoring, then SIGTERM the master (by its pid), SIGKILL after ``timeout``."""
        self._stopping.set()
        with self._lock:
            if self._popen is not None:
                self._kill(self._popen, timeout)
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout)

    @staticmethod
    def _kill(popen: subprocess.Popen[bytes], timeout: float) -> None:
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("HAProxy master %d ignored SIGTERM; killing it", popen.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGKILL)
                popen.wait(timeout)

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            popen = self._popen
            if popen is None or popen.poll() is None:
                continue
            log.warning("HAProxy master %d died (exit %s); restarting it",
                        popen.pid, popen.returncode)
            restarted = False
            try:
                for attempt in backoff((HAProxyError, OSError), stop_event=self._stopping,
                                       initial=self.backoff[0], maximum=self.backoff[1],
                                       what="restarting HAProxy", logger=log):
                    with attempt, self._lock:
                        if self._stopping.is_set() or self._popen is not popen:
                            break
                        self._spawn()
                        self.restarts += 1
                        restarted = True
            except (HAProxyError, OSError):
                return  # only when stopping: backoff() never gives up otherwise
            if restarted and self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception:
                    log.exception("on_restart callback failed")


class ExternalHAProxy:
    """An HAProxy someone else runs: runtime API, and reload by command or master CLI.

    ``reload_cmd`` is run without a shell (e.g. ``["systemctl", "reload", "haproxy"]``);
    without it, ``master_socket`` must be given. ``reload_count()`` is the master's
    counter when a master socket is known, else the number of reloads done by us.
    """

    def __init__(self, admin_socket: str | Path, reload_cmd: list[str] | None = None,
                 master_socket: str | Path | None = None, timeout: float = 30.0,
                 server_state_file: Path | None = None) -> None:
        if not reload_cmd and master_socket is None:
            raise HAProxyError("external HAProxy needs a reload command or a master socket")
        self.runtime = HAProxyRuntime(str(admin_socket))
        self.master = HAProxyMaster(str(master_socket)) if master_socket else None
        self.reload_cmd = list(reload_cmd) if reload_cmd else None
        self.timeout = timeout
        self.server_state_file = server_state_file
        self._reloads = 0

    def reload(self) -> None:
        old = self.runtime.pid()
        if self.server_state_file is not None:
            save_server_state(self.runtime, self.server_state_file)
        if self.reload_cmd:
            try:
                proc = subprocess.run(self.reload_cmd, capture_output=True, text=True,
                                      timeout=self.timeout, stdin=subprocess.DEVNULL,
                                      check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HAProxyError(f"reload command {self.reload_cmd}: {exc}") from exc
            if proc.returncode != 0:
                out = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise HAProxyError(f"reload command {self.reload_cmd} exited "
                                   f"{proc.returncode}: {' | '.join(out)}")
        else:
            assert self.master is not None
            self.master.reload(self.timeout)
        _wait_worker(self.runtime, lambda pid: pid != old, self.timeout)
        self._reloads += 1

    def reload_count(self) -> int:
        return self.master.reload_count() if self.master is not None else self._reloads

    def stop(self) -> None:
        """Nothing to stop: this HAProxy is not ours."""
