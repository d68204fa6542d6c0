"""``bench/registration.py``'s rig: the agent under test (its process, log and ``/proc``
figures), the bench's own recorder of Docker's events and the registry's changes, and the
example-app containers it starts and removes.
"""


from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from common import say
from procs import Daemon, discovery_cmd
from requests.exceptions import RequestException

from discovery.registry import Change, Registry
from tests.harness.dockerd import remove_containers, run_app
from tests.harness.util import free_port

DOCKER_PATIENCE = 90.0  # s to wait for a dockerd that others' tests restarted
T = TypeVar("T")


# --------------------------------------------------------------------------- statistics


def ms(values_ns: Sequence[int]) -> list[float]:
    return [v / 1e6 for v in values_ns]


# --------------------------------------------------------------------------- the agent


class Agent(Daemon):
    """``python -m discovery agent`` in its own session; stopped by its pid (routing.Daemon)."""

    def __init__(self, url: str, node: str, log_path: Path, log_level: str,
                 extra: Sequence[str] = ()) -> None:
        super().__init__(discovery_cmd("agent", "--registry", url, "--node", node, *extra,
                                       log_level=log_level), log_path)
        self.url, self.node = url, node

    def log(self) -> str:
        return self.log_text()

    def wait_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if not self.alive:
                raise RuntimeError(f"agent {self.node} exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {self.node}: no {needle!r} in its log within "
                                   f"{timeout:g}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def proc_sample(self) -> dict[str, int]:
        """VmRSS/VmHWM/RssAnon/RssFile/Pss (KiB), Threads and utime+stime (ticks)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    out[key] = int(value.split()[0])
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out["ticks"] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return out


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: "
                       r"(registered|deregistered) ([^/\s]+)/(\S+)")


def agent_write_times(log_text: str, service: str) -> dict[str, dict[str, list[int]]]:
    """From the agent's log: ``{cid12: {"registered"|"deregistered": [ns, ...]}}``.

    The agent logs right after the registry call returned; its timestamps have 1 ms
    resolution (truncated, local time), so this only splits the latency roughly into an
    agent-side part (event delivery + handling + the registry write) and a watch-side part.
    """
    out: dict[str, dict[str, list[int]]] = {}
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if not m or m.group(3) != service or m.group(4).count(":") < 2:
            continue
        stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        cid = m.group(4).split(":")[-2]
        out.setdefault(cid, {}).setdefault(m.group(2), []).append(
            round(stamp * 1e3) * 1_000_000)
    return out


def first_at_or_after(stamps: Sequence[int], since: int) -> int | None:
    """First of ``stamps`` not before ``since`` (minus the log's 1 ms truncation)."""
    return next((s for s in stamps if s >= since - 1_000_000), None)


# --------------------------------------------------------------------------- recording


@dataclass
class Times:
    """Per container (by the first 12 hex digits of its id), in ns since the epoch."""

    healthy: int | None = None  # Docker timeNano of the first "health_status: healthy"
    kill: int | None = None  # Docker timeNano of the first "kill"
    unhealthy: int = 0  # "health_status: unhealthy" events seen (flaps under load)
    healthy_seen: int | None = None  # when the bench's own event stream delivered those two
    kill_seen: int | None = None
    changes: list[tuple[str, int]] = field(default_factory=list)  # (put|delete, watch arrival)

    def first_put(self) -> int | None:
        return next((t for kind, t in self.changes if kind == "put"), None)

    def registered_at(self, stamp: int) -> bool:
        """Whether the last change that arrived before ``stamp`` was a put."""
        before = [kind for kind, t in self.changes if t <= stamp]
        return bool(before) and before[-1] == "put"

    def first_delete_after(self, stamp: int) -> int | None:
        return next((t for kind, t in self.changes if kind == "delete" and t >= stamp), None)


@dataclass
class Recorder:
    """Docker events and registry-watch arrivals for the services of one backend."""

    client: docker.DockerClient
    registry: Registry
    services: set[str]
    times: dict[str, Times] = field(default_factory=dict)
    live: dict[str, set[str]] = field(default_factory=dict)  # service -> cid12 registered
    resets: int = 0
    events_ended: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _streams: list[Any] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _watch: Any = None
    _stopping: bool = False

    def start(self) -> Recorder:
        # Several label filters would be ANDed by dockerd: one event stream per service.
        for svc in sorted(self.services):
            filters = {"type": ["container"], "event": ["health_status", "kill"],
                       "label": [f"discovery.service={svc}"]}
            stream = self.client.api.events(decode=True, filters=filters)
            self._streams.append(stream)
            t = threading.Thread(target=self._events, args=(stream,), daemon=True,
                                 name=f"bench-events-{svc}")
            self._threads.append(t)
            t.start()
        self._watch = self.registry.watch(self._on_change)
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.stop()
        for stream in self._streams:
            with contextlib.suppress(Exception):
                stream.close()
        for t in self._threads:
            t.join(2)

    def _rec(self, cid12: str) -> Times:
        rec = self.times.get(cid12)
        if rec is None:
            rec = self.times[cid12] = Times()
        return rec

    def _events(self, stream: Any) -> None:
        with contextlib.suppress(Exception):  # ends when stop() closes the stream
            for ev in stream:
                action = str(ev.get("Action") or ev.get("status") or "")
                cid12 = str(ev.get("id") or ev.get("Actor", {}).get("ID", ""))[:12]
                stamp = int(ev.get("timeNano") or 0)
                seen = time.time_ns()
                with self._cond:
                    rec = self._rec(cid12)
                    if action == "health_status: healthy" and rec.healthy is None:
                        rec.healthy, rec.healthy_seen = stamp, seen
                    elif action == "health_status: unhealthy":
                        rec.unhealthy += 1
                    elif action == "kill" and rec.kill is None:
                        rec.kill, rec.kill_seen = stamp, seen
                    self._cond.notify_all()
        if not self._stopping:
            say("the Docker event stream ended (dockerd restarted?): later events are missing")
            with self._cond:
                self.events_ended = True
                self._cond.notify_all()

    def _on_change(self, change: Change) -> None:
        now = time.time_ns()
        if change.kind == "reset":
            with self._cond:
                self.resets += 1
            say(f"registry watch reset (#{self.resets}); figures may be incomplete")
            return
        service, instance_id = change.key
        if service not in self.services:
            return
        parts = instance_id.split(":")  # <node>:<container-id[:12]>:<container-port>
        if len(parts) < 3:
            return
        cid12 = parts[-2]
        with self._cond:
            live = self.live.setdefault(service, set())
            (live.add if change.kind == "put" else live.discard)(cid12)
            self._rec(cid12).changes.append((change.kind, now))
            self._cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or self.events_ended:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def check_docker(self) -> None:
        """Raise when dockerd went away meanwhile: the phase's figures would be wrong."""
        if self.events_ended:
            raise RuntimeError("the Docker event stream ended (was dockerd restarted?); "
                               "this backend's figures would be wrong, so none are reported")

    def count_live(self, service: str) -> int:
        with self._cond:
            return len(self.live.get(service, ()))

    def copy(self, cids: Sequence[str]) -> dict[str, Times]:
        with self._cond:
            out = {}
            for c in cids:
                t = self.times.get(c, Times())
                out[c] = Times(t.healthy, t.kill, t.unhealthy, t.healthy_seen, t.kill_seen,
                               list(t.changes))
            return out


# --------------------------------------------------------------------------- containers


def docker_retry(what: str, fn: Callable[[], T], patience: float = DOCKER_PATIENCE) -> T:
    """``fn()``, retried while dockerd is unreachable (others' tests may restart it)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return fn()
        except (RequestException, docker.errors.DockerException) as exc:
            if isinstance(exc, docker.errors.APIError) or time.monotonic() > deadline:
                raise
            say(f"{what}: dockerd unreachable ({type(exc).__name__}); retrying")
            time.sleep(1.0)


class Containers:
    """Starts example-app containers (a few at once) and removes exactly those, by id."""

    def __init__(self, image: str, parallel: int) -> None:
        self.image, self.parallel = image, max(1, parallel)
        self.ids: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._ports: set[int] = set()

    def client(self) -> docker.DockerClient:
        client: docker.DockerClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = docker.from_env(timeout=60)
        return client

    def port(self) -> int:
        with self._lock:
            while (p := free_port()) in self._ports:
                pass
            self._ports.add(p)
            return p

    def start(self, names: Sequence[str], labels: Callable[[int], dict[str, str]],
              healthcheck: dict[str, Any] | None) -> list[str]:
        def one(name: str) -> str:
            port = self.port()
            c = run_app(self.client(), name=f"{name}-{port}", port=port, labels=labels(port),
                        healthcheck=healthcheck, image=self.image)
            cid = str(c.id)
            with self._lock:
                self.ids.append(cid)
            return cid

        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="bench-start")
        try:
            return list(pool.map(one, names))
        finally:  # on Ctrl-C or an error: start nothing more (what did start is in self.ids)
            pool.shutdown(wait=True, cancel_futures=True)

    def remove(self, ids: Sequence[str] | None = None) -> None:
        with self._lock:
            todo = list(self.ids if ids is None else ids)
        chunks = [todo[i::self.parallel] for i in range(self.parallel)]

        def rm(chunk: list[str]) -> None:
            docker_retry("docker rm", lambda: remove_containers(self.client(), chunk))

        with ThreadPoolExecutor(self.parallel, thread_name_prefix="bench-rm") as pool:
            list(pool.map(rm, chunks))
        with self._lock:
            gone = set(todo)
            self.ids = [i for i in self.ids if i not in gone]
