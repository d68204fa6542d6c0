#!/usr/bin/env python3
"""Registration benchmark: Docker health/kill events → registry, per backend; agent RSS and CPU.

For each backend (etcd single node, then ZooKeeper single node: one backend at a time,
sequentially, in the same run) this script starts a private server on a free loopback port,
its own ``discovery agent`` process (own ``--node``, own prefix), and then:

1. **latency**: starts ``--containers`` example-app containers (host network, 127.0.0.1, a
   Docker HEALTHCHECK every ``--health-interval`` s, labels ``discovery.service`` and
   ``discovery.port``), waits until every one is registered, then ``docker kill``s them one by
   one ``--kill-gap`` s apart (``--stop-with stop``: ``docker stop``). Latency = (time the
   bench's registry watch delivered the put/delete, ``time.time_ns()``) - (Docker's
   ``timeNano`` of ``health_status: healthy`` / ``kill``). Both clocks are this host's, so no
   clock skew; the figure includes the watch notification delay, i.e. it is conservative.
2. **idle**: starts ``--idle-containers`` containers checked by the agent itself
   (``discovery.check=tcp``, default interval 2 s; ``--idle-check docker`` to follow a Docker
   HEALTHCHECK instead), waits until all are registered, lets it settle, then reads the agent's
   ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, RssFile, Threads), ``smaps_rollup`` (Pss)
   and ``/proc/<pid>/stat`` (utime+stime) over an ``--idle-seconds`` window → RSS and CPU in
   percent of one core.

Output: one JSON line per metric on stdout (``backend, metric, n, p50_ms, p99_ms, max_ms,
target, pass``, …), then a human table. Progress goes to stderr. Every container (by id),
agent and server (by pid) this script started is removed/stopped on exit, Ctrl-C included.
See docs/benchmarks.md for figures and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
import docker.errors  # noqa: E402
from common import Daemon, discovery_cmd, machine, percentile, started, write_result  # noqa: E402
from requests.exceptions import RequestException  # noqa: E402

from discovery.registry import Change, Registry, open_registry  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    app_healthcheck,
    build_example_image,
    cleanup_session_containers,
    remove_containers,
    run_app,
)
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

TARGET_P99_MS = 100.0
TARGET_RSS_MIB = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
BACKENDS = ("etcd", "zk")
DOCKER_PATIENCE = 90.0  # s to wait for a dockerd that others' tests restarted
T = TypeVar("T")


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Interrupted(BaseException):  # like KeyboardInterrupt: not caught as an Exception
    """SIGINT/SIGTERM: unwind through every ``finally`` (which cleans up) once."""


# --------------------------------------------------------------------------- statistics


def ms(values_ns: Sequence[int]) -> list[float]:
    return [v / 1e6 for v in values_ns]


class HostCpu:
    """Whole-host CPU busy percentage between ``start()`` and ``stop()`` (from /proc/stat)."""

    def __init__(self) -> None:
        self._a: list[int] = []

    @staticmethod
    def _read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def start(self) -> HostCpu:
        self._a = self._read()
        return self

    def busy_pct(self) -> float:
        b = self._read()
        total = sum(b) - sum(self._a)
        idle = (b[3] + b[4]) - (self._a[3] + self._a[4])
        return round(100.0 * (total - idle) / total, 1) if total > 0 else math.nan


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


# --------------------------------------------------------------------------- one backend


def latency_metric(backend: str, metric: str, values_ms: list[float], expected: int,
                   **extra: Any) -> dict[str, Any]:
    n = len(values_ms)
    p99 = percentile(values_ms, 0.99)
    ok = n == expected and n > 0 and p99 <= TARGET_P99_MS
    return {
        "backend": backend, "metric": metric, "n": n, "expected": expected,
        "p50_ms": round(percentile(values_ms, 0.50), 2), "p99_ms": round(p99, 2),
        "max_ms": round(max(values_ms), 2) if values_ms else math.nan,
        "min_ms": round(min(values_ms), 2) if values_ms else math.nan,
        "target": f"p99 <= {TARGET_P99_MS:g} ms", "pass": ok, **extra,
    }


def split_stats(values_ns: list[int]) -> dict[str, float]:
    vals = ms(values_ns)
    if not vals:
        return {}
    return {"p50_ms": round(percentile(vals, 0.5), 1), "p99_ms": round(percentile(vals, 0.99), 1),
            "max_ms": round(max(vals), 1)}


@dataclass
class Options:
    backends: list[str]
    containers: int
    idle_containers: int
    idle_seconds: float
    idle_settle: float
    idle_check: str
    idle_health_interval: float
    health_interval: float
    kill_gap: float
    stop_with: str
    parallel: int
    timeout: float
    agent_log_level: str
    agent_args: list[str]
    py_spy: str | None
    work: Path
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)


def start_py_spy(opts: Options, agent: Agent, name: str,
                 rate: int) -> subprocess.Popen[bytes] | None:
    """With ``--py-spy``: sample the agent (all threads, folded stacks) until stop_py_spy."""
    if not opts.py_spy:
        return None
    folded = opts.work / f"{name}.folded"
    spy = subprocess.Popen(
        [opts.py_spy, "record", "--pid", str(agent.pid), "--rate", str(rate), "--nonblocking",
         "--threads", "--format", "raw", "--output", str(folded)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    say(f"py-spy (pid {spy.pid}) samples the agent into {folded}")
    time.sleep(0.5)  # attached before anything happens
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


def guarded(what: str, fn: Callable[[], object]) -> None:
    """Cleanup step: never let one failure skip the next step."""
    try:
        fn()
    except Exception as exc:
        say(f"cleanup: {what} failed: {exc!r}")


def run_backend(backend: str, opts: Options, image: str, token: str,
                emit: Callable[[dict[str, Any]], None]) -> None:
    node = f"bench-{backend}"
    svc_lat = f"bench-{token}-{backend}-lat"
    svc_idle = f"bench-{token}-{backend}-idle"
    server: ServerCluster = (EtcdCluster(1, opts.work / "etcd") if backend == "etcd"
                             else ZkEnsemble(1, opts.work / "zk"))
    containers = Containers(image, opts.parallel)
    agent: Agent | None = None
    registry: Registry | None = None
    recorder: Recorder | None = None
    client = docker.from_env(timeout=60)
    started_at, machine_info = started(), machine()
    rows: list[dict[str, Any]] = []

    def emit_row(row: dict[str, Any]) -> None:
        rows.append(row)
        emit(row)

    try:
        docker_retry("docker ping", client.ping)
        say(f"{backend}: starting a single-node server on loopback")
        server.start()
        url = server.url(f"/bench-{token}-{backend}")
        registry = open_registry(url)
        recorder = Recorder(client, registry, {svc_lat, svc_idle}).start()
        agent = Agent(url, node, opts.work / f"agent-{backend}.log", opts.agent_log_level,
                      opts.agent_args).start()
        try:
            agent.wait_log("docker: connected", timeout=15)
        except TimeoutError:  # the log wording changed? carry on if it is still running
            if not agent.alive:
                raise
            say(f"{backend}: no 'docker: connected' in the agent log; assuming it is up")
        time.sleep(0.5)
        base = agent.proc_sample()
        say(f"{backend}: agent pid {agent.pid} up ({url}, node {node}), "
            f"RSS {base['VmRSS'] / 1024:.1f} MiB with nothing registered")
        if opts.containers > 0:
            run_latency(backend, opts, svc_lat, containers, agent, recorder, emit_row)
        if opts.idle_containers > 0:
            run_idle(backend, opts, svc_idle, containers, agent, recorder, emit_row,
                     base["VmRSS"])
        code = agent.stop()
        say(f"{backend}: agent stopped (exit {code})")
        bench = "registration" if opts.containers > 0 else f"registration-idle-{opts.idle_check}"
        path = write_result(bench, backend, started_at=started_at, machine_info=machine_info,
                            summary={"rows": rows}, samples=opts.samples.get(backend, {}))
        say(f"{backend}: raw result written to {path}")
    finally:
        say(f"{backend}: cleaning up")
        if agent is not None:
            guarded("stopping the agent", agent.stop)
        guarded("removing containers", containers.remove)
        if recorder is not None:
            guarded("stopping the recorder", recorder.stop)
        if registry is not None:
            guarded("closing the registry client", lambda: registry.close(revoke=False))
        guarded(f"stopping {backend}", server.stop)
        guarded("closing the docker client", client.close)


def run_latency(backend: str, opts: Options, svc: str, containers: Containers, agent: Agent,
                rec: Recorder, emit: Callable[[dict[str, Any]], None]) -> None:
    n = opts.containers
    say(f"{backend}: latency phase: starting {n} containers ({opts.parallel} at a time, "
        f"HEALTHCHECK every {opts.health_interval:g}s: the first probe comes that long after "
        f"the start)")
    spy = start_py_spy(opts, agent, f"latency-{backend}", rate=1000)
    cpu_up = HostCpu().start()
    t0 = time.monotonic()
    ids = containers.start(
        [f"bench-{backend}-lat-{i}" for i in range(n)],
        lambda port: {"discovery.service": svc, "discovery.port": str(port)},
        app_healthcheck(interval=opts.health_interval))
    cids = [c[:12] for c in ids]
    say(f"{backend}: {n} started in {time.monotonic() - t0:.1f}s; waiting for all registered")
    if not rec.wait(lambda: rec.count_live(svc) >= n, opts.timeout + opts.health_interval):
        say(f"{backend}: only {rec.count_live(svc)}/{n} registered within the timeout")
    rec.check_docker()
    up_busy = cpu_up.busy_pct()
    say(f"{backend}: {rec.count_live(svc)}/{n} registered "
        f"({time.monotonic() - t0:.1f}s after the first start); `docker {opts.stop_with}` "
        f"them one by one, "
        f"{opts.kill_gap * 1000:g} ms apart")
    time.sleep(1.0)  # let the last registrations' watch traffic settle
    cpu_down = HostCpu().start()
    api = containers.client().api
    for cid in ids:
        end = (functools.partial(api.kill, cid) if opts.stop_with == "kill"
               else functools.partial(api.stop, cid, timeout=10))
        with contextlib.suppress(docker.errors.NotFound):
            docker_retry(f"docker {opts.stop_with}", end)
        time.sleep(opts.kill_gap)
    if not rec.wait(lambda: rec.count_live(svc) == 0, opts.timeout):
        say(f"{backend}: {rec.count_live(svc)} still registered after the timeout")
    time.sleep(0.5)  # late kill events from the stream
    down_busy = cpu_down.busy_pct()
    stop_py_spy(spy)
    rec.check_docker()

    snap = rec.copy(cids)
    logged = agent_write_times(agent.log(), svc)
    up_ns, up_agent, up_watch = [], [], []
    down_ns, down_agent, down_watch = [], [], []
    not_registered_at_kill = 0
    up_docker = [t.healthy_seen - t.healthy for t in snap.values()
                 if t.healthy is not None and t.healthy_seen is not None]
    down_docker = [t.kill_seen - t.kill for t in snap.values()
                   if t.kill is not None and t.kill_seen is not None]
    for c, t in snap.items():
        lg = logged.get(c, {})
        put = t.first_put()
        if t.healthy is not None and put is not None:
            up_ns.append(put - t.healthy)
            reg = first_at_or_after(lg.get("registered", []), t.healthy)
            if reg is not None:
                up_agent.append(reg - t.healthy)
                up_watch.append(put - reg)
        if t.kill is None:
            continue
        if not t.registered_at(t.kill):
            not_registered_at_kill += 1
            continue
        gone = t.first_delete_after(t.kill)
        if gone is not None:
            down_ns.append(gone - t.kill)
            dereg = first_at_or_after(lg.get("deregistered", []), t.kill)
            if dereg is not None:
                down_agent.append(dereg - t.kill)
                down_watch.append(gone - dereg)
    flaps = sum(t.unhealthy for t in snap.values())
    notes = {"unhealthy_events": flaps, "watch_resets": rec.resets,
             "docker_events_ended": rec.events_ended}
    opts.samples.setdefault(backend, {}).update({
        "healthy_to_registered_ms": [round(v, 3) for v in ms(up_ns)],
        "kill_to_removed_ms": [round(v, 3) for v in ms(down_ns)],
        "split_event_to_agent_log_up_ms": ms(up_agent),
        "split_agent_log_to_watch_up_ms": ms(up_watch),
        "split_event_to_agent_log_down_ms": ms(down_agent),
        "split_agent_log_to_watch_down_ms": ms(down_watch)})
    emit(latency_metric(
        backend, "healthy_to_registered", ms(up_ns), n, host_cpu_busy_pct=up_busy,
        health_interval_s=opts.health_interval,
        docker_event_delivery_to_bench=split_stats(up_docker),
        split_event_to_agent_log=split_stats(up_agent),
        split_agent_log_to_watch=split_stats(up_watch), **notes))
    emit(latency_metric(
        backend, "kill_to_removed", ms(down_ns), n, host_cpu_busy_pct=down_busy,
        kill_gap_s=opts.kill_gap, stopped_with=opts.stop_with,
        not_registered_at_kill=not_registered_at_kill,
        docker_event_delivery_to_bench=split_stats(down_docker),
        split_event_to_agent_log=split_stats(down_agent),
        split_agent_log_to_watch=split_stats(down_watch), **notes))
    say(f"{backend}: removing the {n} killed containers")
    containers.remove(ids)


def run_idle(backend: str, opts: Options, svc: str, containers: Containers, agent: Agent,
             rec: Recorder, emit: Callable[[dict[str, Any]], None], base_rss_kib: int) -> None:
    n = opts.idle_containers
    if opts.idle_check == "tcp":
        def labels(port: int) -> dict[str, str]:
            return {"discovery.service": svc, "discovery.port": str(port),
                    "discovery.check": "tcp"}
        healthcheck = None
        check = "tcp (agent-side, default interval 2s)"
    else:
        def labels(port: int) -> dict[str, str]:
            return {"discovery.service": svc, "discovery.port": str(port)}
        healthcheck = app_healthcheck(interval=opts.idle_health_interval)
        check = f"docker HEALTHCHECK every {opts.idle_health_interval:g}s"
    say(f"{backend}: idle phase: starting {n} containers, check {check}")
    t0 = time.monotonic()
    containers.start([f"bench-{backend}-idle-{i}" for i in range(n)], labels, healthcheck)
    say(f"{backend}: {n} started in {time.monotonic() - t0:.1f}s; waiting for all registered")
    if not rec.wait(lambda: rec.count_live(svc) >= n,
                    opts.timeout + (opts.idle_health_interval if healthcheck else 0)):
        say(f"{backend}: only {rec.count_live(svc)}/{n} registered within the timeout")
    rec.check_docker()
    registered = rec.count_live(svc)
    say(f"{backend}: {registered}/{n} registered; settling {opts.idle_settle:g}s, then "
        f"measuring {opts.idle_seconds:g}s")
    time.sleep(opts.idle_settle)
    spy = start_py_spy(opts, agent, f"idle-{backend}", rate=200)
    host = HostCpu().start()
    first = agent.proc_sample()
    w0 = time.monotonic()
    rss_max = first["VmRSS"]
    while time.monotonic() - w0 < opts.idle_seconds:
        time.sleep(min(1.0, max(0.0, opts.idle_seconds - (time.monotonic() - w0))))
        rss_max = max(rss_max, agent.proc_sample()["VmRSS"])
    last = agent.proc_sample()
    wall = time.monotonic() - w0
    stop_py_spy(spy)
    rec.check_docker()
    still = rec.count_live(svc)
    cpu_pct = 100.0 * (last["ticks"] - first["ticks"]) / CLK_TCK / wall
    rss_kib = max(rss_max, last["VmRSS"])
    rss_mib = rss_kib / 1024
    common = {"backend": backend, "n": registered, "expected": n, "check": check,
              "window_s": round(wall, 1), "still_registered": still,
              "host_cpu_busy_pct": host.busy_pct(), "threads": last["Threads"]}
    emit({**common, "metric": "agent_rss", "rss_mib": round(rss_mib, 1),
          "rss_mb": round(rss_kib * 1024 / 1e6, 1),
          "rss_empty_mib": round(base_rss_kib / 1024, 1),
          "rss_anon_mib": round(last.get("RssAnon", 0) / 1024, 1),
          "rss_file_mib": round(last.get("RssFile", 0) / 1024, 1),
          "pss_mib": round(last.get("Pss", 0) / 1024, 1),
          "hwm_mib": round(last["VmHWM"] / 1024, 1),
          "target": f"<= {TARGET_RSS_MIB:g} MiB",
          "pass": registered == n and still == n and rss_mib <= TARGET_RSS_MIB})
    emit({**common, "metric": "agent_idle_cpu", "cpu_pct_of_one_core": round(cpu_pct, 2),
          "target": None, "pass": None})


# --------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'backend':<8} {'metric':<22} {'n':>4}  {'p50':>9} {'p99':>9} {'max':>9}  "
             f"{'target':<18} {'result':<6}"]
    for r in rows:
        if "p50_ms" in r:
            cells = [f"{r['p50_ms']:>7.1f}ms", f"{r['p99_ms']:>7.1f}ms", f"{r['max_ms']:>7.1f}ms"]
        elif r["metric"] == "agent_rss":
            cells = [f"{r['rss_mib']:>6.1f}MiB", f"hwm {r['hwm_mib']:.0f}", ""]
        else:
            cells = [f"{r['cpu_pct_of_one_core']:>7.2f}%", "(of one", "core)"]
        result = {True: "PASS", False: "FAIL", None: "-"}[r["pass"]]
        lines.append(f"{r['backend']:<8} {r['metric']:<22} {r['n']:>4}  {cells[0]:>9} "
                     f"{cells[1]:>9} {cells[2]:>9}  {r['target'] or '(none)':<18} {result:<6}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Docker event → registry latency per backend, and agent RSS/CPU at idle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, run one after the other: etcd, zk")
    p.add_argument("--containers", type=int, default=60,
                   help="containers per backend for the latency phase (>= 50 for the issue)")
    p.add_argument("--health-interval", type=float, default=5.0,
                   help="Docker HEALTHCHECK interval (s) of the latency-phase containers")
    p.add_argument("--kill-gap", type=float, default=0.05, help="pause between docker kills (s)")
    p.add_argument("--stop-with", choices=("kill", "stop"), default="kill",
                   help="end the latency containers with `docker kill` (SIGKILL) or `docker stop` "
                        "(SIGTERM): both emit the `kill` event the latency is measured from")
    p.add_argument("--idle-containers", type=int, default=100,
                   help="registered containers during the RSS/CPU measurement (0: skip)")
    p.add_argument("--idle-check", choices=("tcp", "docker"), default="tcp",
                   help="idle-phase health check: agent-side tcp, or a Docker HEALTHCHECK")
    p.add_argument("--idle-health-interval", type=float, default=30.0,
                   help="Docker HEALTHCHECK interval (s) with --idle-check docker")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="RSS/CPU window (s); 30 = the agent's default --resync, so the window "
                        "holds one reconcile pass")
    p.add_argument("--idle-settle", type=float, default=3.0,
                   help="pause after the last registration before the window (s)")
    p.add_argument("--parallel", type=int, default=4, help="containers started/removed at once")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="max wait (s) for all registrations / removals per phase")
    p.add_argument("--agent-log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                   help="extra `discovery agent` argument (repeatable): --agent-arg=--resync=30")
    p.add_argument("--py-spy", metavar="BIN",
                   help="py-spy binary: sample the agent during both phases (folded stacks in the "
                        "work dir; implies --keep-logs; perturbs the figures: profile runs only)")
    p.add_argument("--json-out", type=Path, help="also write the JSON lines to this file")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the work dir (agent and server logs) and print its path")
    args = p.parse_args(argv)
    if args.py_spy:
        args.keep_logs = True
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        p.error(f"--backends: unknown {bad or '(none)'}; choose from {', '.join(BACKENDS)}")
    if not 0 <= args.containers <= 500 or not 0 <= args.idle_containers <= 500:
        p.error("--containers / --idle-containers: 0..500")
    if not 0 < args.idle_seconds <= 300 or not 0 < args.timeout <= 600:
        p.error("--idle-seconds: (0, 300]; --timeout: (0, 600]")
    if not 1 <= args.parallel <= 16:
        p.error("--parallel: 1..16")
    return args


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; later ones do not cut the cleanup.

    Installed explicitly, so Ctrl-C works even when the shell started us with SIGINT ignored.
    """
    fired = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            say(f"signal {signum}: still cleaning up, please wait")
            return
        fired = True
        raise Interrupted(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="discovery-bench-"))
    opts = Options(
        backends=args.backends, containers=args.containers,
        idle_containers=args.idle_containers, idle_seconds=args.idle_seconds,
        idle_settle=args.idle_settle, idle_check=args.idle_check,
        idle_health_interval=args.idle_health_interval, health_interval=args.health_interval,
        kill_gap=args.kill_gap, stop_with=args.stop_with, parallel=args.parallel,
        timeout=args.timeout,
        agent_log_level=args.agent_log_level, agent_args=list(args.agent_arg),
        py_spy=args.py_spy, work=work)
    token = secrets.token_hex(3)
    rows: list[dict[str, Any]] = []
    out = args.json_out.open("w") if args.json_out else None

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    client = docker.from_env(timeout=60)
    t_start = time.monotonic()
    failed = False
    errors: list[str] = []
    with signals_unwind():
        try:
            say(f"run {token}: backends {', '.join(opts.backends)} (one after the other), "
                f"work dir {work}, container session label {SESSION_ID}")
            docker_retry("docker ping", client.ping)
            image = build_example_image(client)
            for backend in opts.backends:
                try:
                    run_backend(backend, opts, image, token, emit)
                except Exception:
                    say(f"{backend}: the benchmark failed:\n{traceback.format_exc()}")
                    errors.append(backend)
        except (KeyboardInterrupt, Interrupted) as exc:
            say(f"interrupted ({type(exc).__name__} {exc})")
            failed = True
        finally:
            try:
                leftovers = docker_retry(
                    "final cleanup", lambda: cleanup_session_containers(client, SESSION_ID))
                if leftovers:
                    say(f"removed {len(leftovers)} leftover container(s) of this run")
            except Exception as exc:
                say(f"final cleanup failed ({exc!r}): remove containers labelled "
                    f"discovery-test.session={SESSION_ID} by hand")
                failed = True
            client.close()
            if out is not None:
                out.close()
            if args.keep_logs or failed or errors:
                say(f"logs kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    say(f"total {time.monotonic() - t_start:.0f}s")
    if rows:
        print(table(rows), flush=True)
    if failed:
        return 130
    if errors:
        say(f"no complete figures for: {', '.join(errors)}")
        return 2
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
