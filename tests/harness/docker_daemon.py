"""The real dockerd itself, for tests and benchmarks: is it up, its pid, starting it with the
flags of ``scripts/setup.sh``, restarting it (SIGTERM, then the same command line), and
``live-restore`` turned on for a while through its ``daemon.json`` and SIGHUP."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from discovery.watcher.adopt import alive
from tests.harness.util import wait_for

DOCKER_PIDFILE = Path("/var/run/docker.pid")
DAEMON_JSON = Path("/etc/docker/daemon.json")  # dockerd's default --config-file
DOCKERD_LOG = Path("/var/log/discovery-dockerd.log")
# Same flags as scripts/setup.sh.
DEFAULT_DOCKERD_ARGS: tuple[str, ...] = (
    "dockerd",
    "--bridge=none",
    "--iptables=false",
    "--ip-masq=false",
)


def docker_info_ok(timeout: float = 10.0) -> bool:
    """True when ``docker info`` succeeds (i.e. the daemon answers)."""
    try:
        proc = subprocess.run(
            ["docker", "info"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False
    return proc.returncode == 0


def dockerd_pid(pidfile: Path = DOCKER_PIDFILE) -> int | None:
    """The running dockerd's pid, from its pidfile (None if absent/stale)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def start_dockerd(args: Sequence[str] = DEFAULT_DOCKERD_ARGS, log: Path = DOCKERD_LOG) -> None:
    """Start dockerd detached, like scripts/setup.sh (``setsid nohup ... &``).

    The log is appended to (setup.sh truncates it), so the pre-restart log survives.
    Does not wait; poll :func:`docker_info_ok`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = f"setsid nohup {shlex.join(args)} >>{shlex.quote(str(log))} 2>&1 </dev/null &"
    subprocess.run(["bash", "-c", cmd], check=True)


def restart_dockerd(timeout: float = 60.0, args: Sequence[str] | None = None) -> int:
    """SIGTERM the running dockerd, wait until it is gone, start a new one; return its pid.

    ``args`` defaults to the old daemon's own command line (read from /proc before the
    kill), falling back to scripts/setup.sh's flags.

    What happens to containers: with live-restore off (the default, and how setup.sh
    starts dockerd) dockerd stops every running container on shutdown (their stop signal,
    SIGKILL after the stop timeout; the example app stops at once). After the restart
    they are ``exited`` with the same ids, names and labels, except those with restart
    policy ``always``/``unless-stopped``, which dockerd starts again. The event stream of
    a watcher breaks (die/stop events first). With ``--live-restore`` containers keep
    running. docker-py clients made earlier keep working (new connections per request),
    but streaming calls (``events()``) must be reopened.
    """
    deadline = time.monotonic() + timeout
    pid = dockerd_pid()
    if pid is None:
        raise RuntimeError(f"no running dockerd found via {DOCKER_PIDFILE}")
    if args is None:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            args = [a.decode() for a in raw.split(b"\0") if a] or list(DEFAULT_DOCKERD_ARGS)
        except OSError:
            args = list(DEFAULT_DOCKERD_ARGS)
    os.kill(pid, signal.SIGTERM)
    wait_for(
        lambda: not alive(pid) and not docker_info_ok(timeout=2.0),
        timeout=max(deadline - time.monotonic(), 1.0),
        interval=0.1,
        message=f"dockerd (pid {pid}) to exit after SIGTERM",
    )
    start_dockerd(args)
    wait_for(
        lambda: docker_info_ok(timeout=5.0),
        timeout=max(deadline - time.monotonic(), 1.0),
        interval=0.2,
        message=f"the restarted dockerd to answer `docker info` (see {DOCKERD_LOG})",
    )
    new_pid = wait_for(dockerd_pid, timeout=5.0, message="the new dockerd pidfile")
    assert new_pid is not None
    return new_pid


def live_restore_enabled() -> bool:
    """What the running dockerd says: ``docker info --format '{{.LiveRestoreEnabled}}'``."""
    out = subprocess.run(
        ["docker", "info", "--format", "{{.LiveRestoreEnabled}}"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    return out.stdout.strip() == "true"


def _reload_dockerd(config: Mapping[str, Any] | bytes | None, path: Path) -> None:
    """Write (None: remove) dockerd's config file and SIGHUP the running dockerd, which
    re-reads it. A reload applies only the keys the file sets: removing a key (or the file)
    changes nothing, so a value is put back by writing it explicitly first."""
    if config is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    pid = dockerd_pid()
    if pid is not None:
        os.kill(pid, signal.SIGHUP)


@contextlib.contextmanager
def live_restore(path: Path = DAEMON_JSON) -> Iterator[None]:
    """Turn ``live-restore`` on in the running dockerd without restarting it (``"live-restore":
    true`` in its config file, then SIGHUP, as Docker documents), so that the *next* restart
    keeps the containers running; a dockerd started meanwhile reads the same file. On exit,
    even on failure, put everything back as it was: live-restore off again (written
    explicitly, SIGHUP), then the config file's original content, or no file (SIGHUP again).
    Nothing is touched when dockerd already runs with live-restore (``--live-restore`` and the
    file may not both set it)."""
    if live_restore_enabled():
        yield
        return
    original = path.read_bytes() if path.exists() else None
    config: dict[str, Any] = json.loads(original) if original else {}
    try:
        _reload_dockerd({**config, "live-restore": True}, path)
        wait_for(live_restore_enabled, timeout=15.0, interval=0.2,
                 message=f"dockerd to turn live-restore on after SIGHUP ({path})")
        yield
    finally:
        try:
            if dockerd_pid() is not None:
                _reload_dockerd({**config, "live-restore": False}, path)
                wait_for(lambda: docker_info_ok() and not live_restore_enabled(), timeout=30.0,
                         interval=0.2, message="dockerd to turn live-restore off after SIGHUP")
        finally:
            _reload_dockerd(original, path)
