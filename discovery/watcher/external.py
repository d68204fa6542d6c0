"""Driving an HAProxy someone else runs (``--haproxy-socket``), and helpers both share."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

from discovery.errors import HAProxyError
from discovery.files import write_atomic
from discovery.retry import poll
from discovery.watcher.haproxy import HAProxyMaster, HAProxyRuntime

log = logging.getLogger(__name__)


def save_server_state(runtime: HAProxyRuntime, path: Path) -> None:
    """Dump ``show servers state`` to ``path`` atomically (for ``server-state-file``).

    HAProxy 2.6 restores admin state, weight and port from it at a reload, but the
    address only for servers whose config line names a host (``localhost:1``), not an IP.
    """
    write_atomic(path, runtime.command("show servers state"))


def wait_worker(runtime: HAProxyRuntime, ok: Callable[[int], bool], timeout: float,
                interval: float = 0.02, settle: int = 3) -> int:
    """Poll ``show info`` on the admin socket until the answering pid satisfies ``ok``
    ``settle`` times in a row. After a reload the old worker shares the socket until its
    soft-stop reaches it, and may answer again after the new one did (seen in ``make
    test``): a runtime change sent then would reach only the old worker."""
    last: list[object] = [None]
    streak: list[int] = []  # the latest answers, in a row, of one pid that satisfies ok

    def answered() -> int | None:
        try:
            pid = runtime.pid()
        except (HAProxyError, KeyError, ValueError) as exc:
            last[0] = exc
            return None
        last[0] = f"pid {pid}"
        if not ok(pid):
            streak.clear()
            return None
        if streak and streak[-1] != pid:
            streak.clear()
        streak.append(pid)
        return pid if len(streak) >= settle else None

    pid = poll(answered, timeout=timeout, interval=interval)
    if pid is None:
        raise HAProxyError(f"{runtime.socket_path}: no new worker answered within "
                           f"{timeout:g}s (last: {last[0]})")
    return pid


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
        wait_worker(self.runtime, lambda pid: pid != old, self.timeout)
        self._reloads += 1

    def reload_count(self) -> int:
        return self.master.reload_count() if self.master is not None else self._reloads

    def stop(self) -> None:
        """Nothing to stop: this HAProxy is not ours."""
