"""What ``bench/routing.py``'s phases share (``bench/faults.py`` too): a poller sending
requests through HAProxy, the example-app containers, Docker's and the registry's event logs,
one run's settings and clients, a single-node registry server and an app's labels.
"""


from __future__ import annotations

import argparse
import contextlib
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import docker.errors  # binds ``docker`` too
from common import Report
from procs import http_get

from discovery.registry import Change, Registry, open_registry
from tests.harness.dockerd import (
    SESSION_ID,
    TEST_LABEL,
    cleanup_session_containers,
    remove_containers,
)
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble


def other_containers(client: docker.DockerClient) -> int:
    """Running containers on this dockerd that this run did not start (other sessions')."""
    try:
        running = client.api.containers(quiet=True)
        ours = client.api.containers(quiet=True, filters={"label": f"{TEST_LABEL}={SESSION_ID}"})
    except docker.errors.DockerException:
        return -1
    return len(running) - len(ours)


class Poller:
    """A thread sending ``GET /`` through HAProxy on ``port`` (new connection each), pausing
    ``pause`` s between requests, at most ``max_requests``. Records, per answering instance
    (the body), the first and the last response time (``time.time_ns()`` at receipt)."""

    def __init__(self, port: int, pause: float = 0.001, max_requests: int = 2_000_000) -> None:
        self.port, self.pause, self.max_requests = port, pause, max_requests
        self.seq = 0
        self.first: dict[str, int] = {}
        self.last: dict[str, tuple[int, int]] = {}  # name -> (ns, seq)
        self.errors = 0
        self.non200 = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="poller")

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.seq < self.max_requests:
            try:
                status, body = http_get(self.port)
            except OSError:
                self.errors += 1
                self.seq += 1
                self._stop.wait(self.pause)
                continue
            now = time.time_ns()
            self.seq += 1
            if status == 200:
                self.first.setdefault(body, now)
                self.last[body] = (now, self.seq)
            else:
                self.non200 += 1
            self._stop.wait(self.pause)

    def since_last(self, name: str) -> int:
        """Responses received since ``name`` last answered (huge if it never did)."""
        last = self.last.get(name)
        return self.seq - last[1] if last else 1 << 30

    def drained(self, name: str, after: int) -> bool:
        return self.since_last(name) >= after

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- Docker


# The example image's busybox, run like examples/app/serve.sh, except that after SIGTERM it
# keeps serving for $GRACE seconds before stopping httpd (an app that drains on shutdown).
GRACEFUL_APP = (
    'mkdir -p /tmp/www; printf "%s\\n" "$NAME" > /tmp/www/index.html; '
    'printf "ok\\n" > /tmp/www/health; '
    'httpd -f -p "127.0.0.1:$PORT" -h /tmp/www & child=$!; '
    "trap 'sleep \"$GRACE\"; kill -TERM \"$child\"; exit 0' TERM INT; "
    'wait "$child"')


class Containers:
    """Starts example-app containers (host network, 127.0.0.1) and removes them by id:
    after their grace period (a background reaper) and, at :meth:`close`, all of them."""

    def __init__(self, client: docker.DockerClient, image: str) -> None:
        self.client, self.image = client, image
        self.ids: list[str] = []
        self._due: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="reaper")
        self._reaper.start()

    def start(self, name: str, port: int, labels: Mapping[str, str], *,
              grace: float | None, healthcheck: Mapping[str, Any] | None = None) -> str:
        api = self.client.api
        env = {"PORT": str(port), "NAME": name}
        entrypoint = None
        if grace is not None and grace > 0:
            env["GRACE"] = f"{grace:g}"
            entrypoint = ["/bin/sh", "-c", GRACEFUL_APP]
        created = api.create_container(
            image=self.image, name=name, detach=True, environment=env,
            labels={**labels, TEST_LABEL: SESSION_ID}, ports=[port],
            host_config=api.create_host_config(network_mode="host"),
            healthcheck=dict(healthcheck) if healthcheck else None, entrypoint=entrypoint)
        cid = str(created["Id"])
        with self._lock:
            self.ids.append(cid)
        api.start(cid)
        return cid

    def stop_signal(self, cid: str, remove_after: float) -> None:
        """``docker kill -s TERM`` (a ``kill`` event, signal 15); removed after ``remove_after``
        seconds by the reaper."""
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.kill(cid, signal="SIGTERM")
        with self._lock:
            self._due.append((time.monotonic() + remove_after, cid))

    def _reap(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                due = [cid for t, cid in self._due if t <= now]
                self._due = [(t, cid) for t, cid in self._due if t > now]
            with contextlib.suppress(Exception):
                remove_containers(self.client, due)

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(5)
        with self._lock:
            ids = list(self.ids)
        try:
            remove_containers(self.client, ids)
        finally:
            with contextlib.suppress(Exception):
                cleanup_session_containers(self.client)


class DockerEvents:
    """Follows Docker's event stream for this run's containers: the ``timeNano`` of each
    container's first ``health_status: healthy`` and first terminating ``kill``."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.healthy: dict[str, int] = {}
        self.killed: dict[str, int] = {}
        self.unhealthy = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._stream = client.events(decode=True, filters={
            "type": "container", "label": f"{TEST_LABEL}={SESSION_ID}"})
        self._thread = threading.Thread(target=self._run, daemon=True, name="docker-events")
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._stream:
                action = str(ev.get("Action") or ev.get("status") or "")
                cid = str(ev.get("id") or ev.get("Actor", {}).get("ID", ""))
                ts = int(ev.get("timeNano") or 0)
                sig = str((ev.get("Actor", {}).get("Attributes") or {}).get("signal", ""))
                with self._cond:
                    if action == "health_status: healthy":
                        self.healthy.setdefault(cid, ts)
                    elif action == "health_status: unhealthy":
                        self.unhealthy += 1
                    elif action == "kill" and sig in ("15", "9", "SIGTERM", "SIGKILL"):
                        self.killed.setdefault(cid, ts)
                    self._cond.notify_all()
        except Exception as exc:
            if not self._closed:
                self.error = exc

    def wait(self, table: dict[str, int], cid: str, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: cid in table, timeout)
            return table.get(cid)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._stream.close()


class RegistryLog:
    """A registry watch in the bench: arrival time (``time.time_ns()``) of each instance's
    first put and first delete, by container id (12 characters, as in instance ids)."""

    def __init__(self, url: str) -> None:
        self.reg: Registry = open_registry(url)
        self.put: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._cond = threading.Condition()
        snap = self.reg.snapshot()
        self._watch = self.reg.watch(self._on_change, snap.revision)

    def _on_change(self, change: Change) -> None:
        now = time.time_ns()
        with self._cond:
            if change.kind == "put" and change.instance is not None:
                cid = change.instance.container_id[:12]
                self._by_key[change.key] = cid
                self.put.setdefault(cid, now)
            elif change.kind == "delete":
                cid = self._by_key.get(change.key, "")
                if cid:
                    self.deleted.setdefault(cid, now)
            self._cond.notify_all()

    def wait_put(self, cid: str, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: cid[:12] in self.put, timeout)
            return self.put.get(cid[:12])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._watch.stop()
        with contextlib.suppress(Exception):
            self.reg.close(revoke=False)


@dataclass
class Run:
    """What every phase shares."""

    args: argparse.Namespace
    work: Path
    report: Report
    client: docker.DockerClient | None = None
    image: str = ""
    token: str = field(default_factory=lambda: secrets.token_hex(3))

    @property
    def service(self) -> str:
        """The routed service: unique to this run, so that no other container on this
        dockerd (other benches and tests run their own agents) lands in its backend."""
        return f"rt-{self.token}"


def start_server(backend: str, work: Path) -> ServerCluster:
    cluster: ServerCluster = (EtcdCluster(1, work / f"{backend}-server") if backend == "etcd"
                              else ZkEnsemble(1, work / f"{backend}-server"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def app_labels(service: str, port: int, *, check: str | None = None) -> dict[str, str]:
    labels = {"discovery.service": service, "discovery.port": str(port)}
    if check == "tcp":
        labels |= {"discovery.check": "tcp", "discovery.check.interval": "250ms",
                   "discovery.check.rise": "1"}
    return labels
