#!/usr/bin/env python3
"""Routing benchmarks: Docker → agent → registry → watcher → HAProxy, end to end.

Three phases, in one run (``--phases``), each starting its own servers, processes and
containers on loopback and removing them when it ends:

1. **propagation** (per backend, etcd then ZooKeeper, single-node servers): a ``discovery
   agent`` and a ``discovery watch`` (its own HAProxy, service ``rt-<random>``), one "anchor"
   instance, and a poller thread sending ``GET /`` through HAProxy as fast as a 0.5 ms pause
   allows (a new connection per request; every example app answers its NAME). Then
   ``--events`` times: start a container with a Docker HEALTHCHECK; **add** = first response
   from it through HAProxy - Docker's ``health_status: healthy`` ``timeNano``; then ``docker
   kill -s TERM`` it (the app keeps answering for ``--grace`` s after SIGTERM, like an app
   that drains); **drain** = last response from it - the ``kill`` event's ``timeNano``,
   taken once ``--drained-after`` responses in a row came from others. A registry watch in
   the bench splits each figure into agent (Docker → registry) and watcher (registry →
   HAProxy) parts.
2. **churn** (``--churn-backend``): ``--churn-pool`` instances serve while
   ``--replacements`` rolling replacements happen, ``--churn-parallel`` at a time (start new,
   wait until the agent registered it, ``docker kill -s TERM`` the oldest). Side by side, at
   the same time and from the same registry: (a) ``discovery watch`` (runtime API) and (b)
   ``bench/reload_per_change.py`` (full render + ``haproxy -c`` + reload on every change,
   like consul-template/confd), each with its own HAProxy and its own ``wrk`` (HTTP/1.1
   keep-alive and ``Connection: close``, ``--churn-loads``; rate bounded by a per-request
   delay). The baseline runs as its careful users run it (``--baseline-tuning best``).
3. **scale** (``bench/scale.py``): 1,000 services x 10 instances.

Output: one JSON object per metric on stdout (``name, backend, n, p50_ms, p99_ms, target,
pass`` and details), then a short summary. Progress on stderr. Exit 0 when every target is
met, 1 when one is missed, 2 when something could not be measured, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import docker.errors  # noqa: E402  (binds ``docker`` too)
from common import (  # noqa: E402
    CLK_TCK,
    HOST,
    Daemon,
    HostLoad,
    Interrupted,
    Report,
    Routed,
    Unmeasured,
    _r,
    answers_200,
    children_of,
    cpu_ticks,
    default_wait,
    discovery_cmd,
    http_get,
    install_signal_handlers,
    percentile,
    rss_kib,
    say,
    summary,
    wait_until,
)

from discovery.errors import DiscoveryError  # noqa: E402
from discovery.registry import Change, Registry, open_registry  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    TEST_LABEL,
    app_healthcheck,
    build_example_image,
    cleanup_session_containers,
    remove_containers,
)
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

TARGET_ADD_P99_MS = 250.0
TARGET_DRAIN_P99_MS = 100.0
TARGET_CHURN_MIN_REQUESTS = 20_000


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


# --------------------------------------------------------------------------- propagation


def run_propagation(run: Run, backend: str, server: ServerCluster) -> None:
    args, report = run.args, run.report
    assert run.client is not None
    url = server.url(f"/bench-routing-{run.token}-{backend}")
    svc = run.service
    grace = float(args.grace)
    with contextlib.ExitStack() as stack:
        agent = Daemon(discovery_cmd("agent", "--registry", url, "--node", f"rt-{backend}"),
                       run.work / f"agent-{backend}.log").start()
        stack.callback(agent.stop)
        port = free_port()
        watcher = Routed.watcher(url, {svc: port}, run.work,
                                 log_level=args.watcher_log_level).start()
        stack.callback(watcher.close)
        watcher.wait_ready([port])
        reglog = RegistryLog(url)
        stack.callback(reglog.close)
        events = DockerEvents(run.client)
        stack.callback(events.close)
        containers = Containers(run.client, run.image)
        stack.callback(containers.close)

        anchor_port = free_port()
        anchor = f"rt-{backend}-anchor-{run.token}"
        containers.start(anchor, anchor_port, app_labels(svc, anchor_port, check="tcp"),
                         grace=grace)
        wait_until(lambda: http_get(port) == (200, anchor), 60, f"{anchor} served on :{port}")
        poller = Poller(port, pause=args.poll_pause).start()
        stack.callback(poller.stop)

        add: list[float] = []
        drain: list[float] = []
        add_agent: list[float] = []
        add_watcher: list[float] = []
        drain_agent: list[float] = []
        drain_watcher: list[float] = []
        problems: list[str] = []
        trace = (run.work / f"events-{backend}.jsonl").open("a")
        stack.callback(trace.close)
        hc = app_healthcheck(interval=args.health_interval, timeout=1.0, retries=2)
        say(f"{backend}: propagation, {args.events} containers one after another")
        mark = report.mark()
        load = HostLoad().start()
        others = other_containers(run.client)
        started = time.monotonic()
        for i in range(args.events):
            name = f"rt-{backend}-{i}-{run.token}"
            cport = free_port()
            try:
                cid = containers.start(name, cport, app_labels(svc, cport), grace=grace,
                                       healthcheck=hc)
            except docker.errors.APIError as exc:
                problems.append(f"{name}: {exc}")
                continue
            healthy_ns = events.wait(events.healthy, cid, 20.0)
            try:
                first_ns = wait_until(partial(poller.first.get, name), 15.0,
                                      f"{name} served", interval=0.002)
            except Unmeasured as exc:
                problems.append(str(exc))
                containers.stop_signal(cid, grace + 1)
                continue
            put_ns = reglog.put.get(cid[:12])
            if healthy_ns is None:
                problems.append(f"{name}: no health_status: healthy event")
            else:
                add.append((first_ns - healthy_ns) / 1e6)
                if put_ns is not None:
                    add_agent.append((put_ns - healthy_ns) / 1e6)
                    add_watcher.append((first_ns - put_ns) / 1e6)
            containers.stop_signal(cid, grace + 1.0)
            kill_ns = events.wait(events.killed, cid, 10.0)
            times = {"name": name, "cid": cid[:12], "healthy": healthy_ns, "put": put_ns,
                     "first": first_ns, "kill": kill_ns}
            try:
                wait_until(partial(poller.drained, name, args.drained_after),
                           grace, f"{name} drained", interval=0.002)
            except Unmeasured as exc:
                problems.append(str(exc))
                continue
            last_ns = poller.last[name][0]
            times |= {"deleted": reglog.deleted.get(cid[:12]), "last": last_ns}
            trace.write(json.dumps(times) + "\n")
            if kill_ns is None:
                problems.append(f"{name}: no kill event")
                continue
            if last_ns - kill_ns >= (grace - 0.2) * 1e9:
                problems.append(f"{name}: still served at the end of its grace period")
                continue
            drain.append((last_ns - kill_ns) / 1e6)
            del_ns = reglog.deleted.get(cid[:12])
            if del_ns is not None:
                drain_agent.append((del_ns - kill_ns) / 1e6)
                drain_watcher.append((last_ns - del_ns) / 1e6)
        elapsed = time.monotonic() - started
        polls = poller.seq
        poller.stop()
        common = {"poll_requests": polls, "poll_rate_per_s": round(polls / elapsed),
                  "poll_errors": poller.errors, "poll_non200": poller.non200,
                  "poll_period_ms": round(elapsed * 1000 / max(polls, 1), 2),
                  "unhealthy_events": events.unhealthy, "watcher_reloads": watcher.reload_count(),
                  "watcher_wait": default_wait(), "other_containers": others,
                  **load.read(), "problems": problems[:5]}
        report.latency("healthy_to_served", backend, add, expected=args.events,
                       target_ms=TARGET_ADD_P99_MS,
                       split_agent_p50_ms=_r(percentile(add_agent, 0.5)),
                       split_agent_p99_ms=_r(percentile(add_agent, 0.99)),
                       split_watcher_p50_ms=_r(percentile(add_watcher, 0.5)),
                       split_watcher_p99_ms=_r(percentile(add_watcher, 0.99)), **common)
        report.latency("kill_to_last_served", backend, drain, expected=args.events,
                       target_ms=TARGET_DRAIN_P99_MS,
                       split_agent_p50_ms=_r(percentile(drain_agent, 0.5)),
                       split_agent_p99_ms=_r(percentile(drain_agent, 0.99)),
                       split_watcher_p50_ms=_r(percentile(drain_watcher, 0.5)),
                       split_watcher_p99_ms=_r(percentile(drain_watcher, 0.99)), **common)
        report.save("propagation", backend, mark, {
            "healthy_to_served_ms": add, "kill_to_last_served_ms": drain,
            "add_agent_ms": add_agent, "add_watcher_ms": add_watcher,
            "drain_agent_ms": drain_agent, "drain_watcher_ms": drain_watcher})


# --------------------------------------------------------------------------- churn

# Counts requests written (``request()``) and responses read (``response()``), so that a
# connection closed while idle (no request on it: wrk still counts a ``read`` error and
# reconnects) is told apart from a request that got no answer (lost).
WRK_LUA = """-- written by bench/routing.py
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; answered = 0; bad = 0 end
function delay() return %(delay)d end
function request() sent = sent + 1; return wrk.format() end
function response(status, headers, body)
  answered = answered + 1
  if status >= 400 then bad = bad + 1 end
end
done = function(summary, latency, requests)
  local sent, answered, bad = 0, 0, 0
  for _, t in ipairs(threads) do
    sent = sent + t:get("sent"); answered = answered + t:get("answered"); bad = bad + t:get("bad")
  end
  local pct = {}
  for _, p in ipairs({50, 90, 99, 99.9, 99.99}) do
    table.insert(pct, string.format('"%%g":%%d', p, latency:percentile(p)))
  end
  io.write(string.format(
    '\\nWRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,'
    .. '"status":%%d,"timeout":%%d,"sent":%%d,"answered":%%d,"bad_status":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d,"max_us":%%d,"percentiles_us":{%%s}}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, sent, answered, bad,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(pct, ",")))
end
"""
LOADS = {"keep-alive": False, "close": True}  # --churn-loads name -> Connection: close


def start_wrk(port: int, work: Path, label: str, *, conns: int, delay_ms: int,
              close: bool, max_seconds: int) -> Daemon:
    script = work / "churn.lua"
    if not script.exists():
        script.write_text(WRK_LUA % {"delay": delay_ms})
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max_seconds}s", "--timeout", "5s", "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    return Daemon([*argv, f"http://{HOST}:{port}/"], work / f"wrk-{label}.log").start()


def wrk_result(d: Daemon) -> dict[str, Any]:
    for line in reversed(d.log_text().splitlines()):
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON "):])
            return data
    raise Unmeasured(f"wrk printed no summary:\n{d.log_tail()}")


class IdleClients:
    """Long-lived keep-alive client connections to ``port``: ``initial`` at once, then one more
    every ``every`` s (at most ``limit``), each sending one request and then staying idle until
    :meth:`close` (like pooled HTTP clients between bursts). Opening them over time means each
    HAProxy worker generation holds some, which is what keeps old workers alive after reloads."""

    def __init__(self, port: int, initial: int, every: float = 0.5, limit: int = 200) -> None:
        self.port, self.every, self.limit = port, every, limit
        self.socks: list[socket.socket] = []
        self.failed = 0
        self._stop = threading.Event()
        for _ in range(initial):
            self._open()
        self._thread = threading.Thread(target=self._run, daemon=True, name="idle-clients")
        if every > 0:
            self._thread.start()

    def _open(self) -> None:
        try:
            s = socket.create_connection((HOST, self.port), 2.0)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            s.recv(4096)
        except OSError:
            self.failed += 1
            return
        self.socks.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.every) and len(self.socks) < self.limit:
            self._open()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class ProcSampler:
    """Every ``period`` s: each HAProxy master's processes (old workers = children beyond the
    newest one) and their RSS, and the listen sockets' accept queues (``ss -ltn``)."""

    def __init__(self, masters: Mapping[str, int | None], ports: dict[int, str],
                 period: float = 0.25) -> None:
        self.masters = {k: v for k, v in masters.items() if v is not None}
        self.ports, self.period = ports, period  # the caller adds app ports as they come
        self.peak_old: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_rss_kib: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_old_rss_kib: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.accept_queue: dict[str, dict[str, int]] = {}  # role -> max Recv-Q, backlog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="proc-sampler")

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for mode, master in self.masters.items():
                kids = sorted(children_of(master))
                old = kids[:-1]  # the newest child is the current worker
                rss = [rss_kib(k).get("VmRSS", 0) for k in kids]
                self.peak_old[mode] = max(self.peak_old[mode], len(old))
                total = rss_kib(master).get("VmRSS", 0) + sum(rss)
                self.peak_rss_kib[mode] = max(self.peak_rss_kib[mode], total)
                self.peak_old_rss_kib[mode] = max(self.peak_old_rss_kib[mode], sum(rss[:-1]))
            self._sample_ss()

    def _sample_ss(self) -> None:
        try:
            out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4 or not parts[1].isdigit():
                continue
            port = int(parts[3].rpartition(":")[2] or 0)
            role = self.ports.get(port)
            if role is None:
                continue
            q = self.accept_queue.setdefault(role, {"max_recv_q": 0, "backlog": 0})
            q["max_recv_q"] = max(q["max_recv_q"], int(parts[1]))
            q["backlog"] = max(q["backlog"], int(parts[2]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_churn(run: Run, backend: str, server: ServerCluster, load: str) -> None:
    """One churn run under ``load`` (``keep-alive`` or ``close``): both routers side by side."""
    args, report = run.args, run.report
    assert run.client is not None
    close = LOADS[load]
    url = server.url(f"/bench-churn-{load}-{run.token}")
    svc = run.service
    grace = float(args.churn_grace)
    mark = report.mark()
    with contextlib.ExitStack() as stack:
        agent = Daemon(discovery_cmd("agent", "--registry", url, "--node", "rt-churn"),
                       run.work / f"agent-churn-{load}.log").start()
        stack.callback(agent.stop)
        reglog = RegistryLog(url)
        stack.callback(reglog.close)
        containers = Containers(run.client, run.image)
        stack.callback(containers.close)
        port_a, port_b = free_port(), free_port()
        ours = Routed.watcher(url, {svc: port_a}, run.work)
        ours.start()
        stack.callback(ours.close)
        base = Routed.baseline(url, {svc: port_b}, run.work, tuning=args.baseline_tuning)
        base.start()
        stack.callback(base.close)
        ours.wait_ready([port_a])
        base.wait_ready([port_b])

        pool: list[tuple[str, str]] = []  # (cid, name), oldest first
        n = 0

        def start_one() -> tuple[str, str]:
            nonlocal n
            with lock:
                n += 1
                name = f"rt-churn-{n}-{run.token}"
            cport = free_port()
            app_ports[cport] = "app"
            cid = containers.start(name, cport, app_labels(svc, cport, check="tcp"), grace=grace)
            if reglog.wait_put(cid, 30.0) is None:
                raise Unmeasured(f"{name} not registered within 30 s")
            return cid, name

        lock = threading.Lock()
        app_ports: dict[int, str] = {port_a: "runtime-api", port_b: "reload-per-change"}
        for _ in range(args.churn_pool):
            pool.append(start_one())
        for p in (port_a, port_b):
            wait_until(partial(answers_200, p), 30, f"the pool served on :{p}")
        time.sleep(0.5)  # both HAProxies have the whole pool
        reloads_before = (ours.reload_count() or 0, base.reload_count() or 0)
        idle = [IdleClients(p, args.idle_conns, every=args.idle_every) for p in (port_a, port_b)]
        for c in idle:
            stack.callback(c.close)

        say(f"churn ({load}): wrk on :{port_a} (runtime API) and :{port_b} (reload per "
            f"change, tuning {args.baseline_tuning}), {args.replacements} rolling "
            f"replacements, {args.churn_parallel} at a time, {args.idle_conns} idle "
            f"keep-alive connections each, one more every {args.idle_every:g} s")
        wrk_opts: dict[str, Any] = {"conns": args.wrk_conns, "delay_ms": args.wrk_delay_ms,
                                    "close": close, "max_seconds": 600}
        wrk_a = start_wrk(port_a, run.work, f"runtime-api-{load}", **wrk_opts)
        stack.callback(wrk_a.stop, signal.SIGKILL)
        wrk_b = start_wrk(port_b, run.work, f"reload-per-change-{load}", **wrk_opts)
        stack.callback(wrk_b.stop, signal.SIGKILL)
        time.sleep(1.0)

        todo = [args.replacements]
        errors: list[BaseException] = []
        done_times: list[float] = []

        def worker() -> None:
            while True:
                with lock:
                    if todo[0] <= 0 or errors:
                        return
                    todo[0] -= 1
                try:
                    t0 = time.monotonic()
                    new = start_one()
                    with lock:
                        old = pool.pop(0)
                        pool.append(new)
                    containers.stop_signal(old[0], grace + 2.0)
                    done_times.append(time.monotonic() - t0)
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    return

        masters = {"runtime-api": ours.haproxy_master_pid(),
                   "reload-per-change": base.haproxy_master_pid()}
        procs = {"runtime-api": ours.pid, "reload-per-change": base.pid}
        ticks0 = {m: cpu_ticks(procs[m]) for m in procs}
        sampler = ProcSampler(masters, app_ports)
        sampler.start()
        stack.callback(sampler.stop)
        hostload = HostLoad().start()
        others = other_containers(run.client)
        started_at = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True, name=f"churn-{i}")
                   for i in range(args.churn_parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.churn_timeout)
        churn_s = time.monotonic() - started_at
        host = hostload.read()
        time.sleep(max(1.0, grace + 0.5))  # the last stopped instances drain and exit
        for d in (wrk_a, wrk_b):
            d.stop(signal.SIGINT, timeout=10)
        ticks = {m: cpu_ticks(procs[m]) - ticks0[m] for m in procs}
        sampler.stop()
        if errors:
            raise Unmeasured(f"churn: {errors[0]!r}")
        if any(t.is_alive() for t in threads):
            raise Unmeasured(f"churn: replacements not done within {args.churn_timeout} s")
        res = {"runtime-api": wrk_result(wrk_a), "reload-per-change": wrk_result(wrk_b)}
        reloads = {"runtime-api": (ours.reload_count() or 0) - reloads_before[0],
                   "reload-per-change": (base.reload_count() or 0) - reloads_before[1]}
        old_at_end = {"runtime-api": ours.old_workers(), "reload-per-change": base.old_workers()}
        base.stop()  # writes its stats file
        base_stats: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            base_stats = json.loads(base.stats_path.read_text())
        changes = 2 * args.replacements  # a put and a delete per replacement
        common = {"load_kind": load, "replacements": args.replacements,
                  "parallel": args.churn_parallel, "pool": args.churn_pool,
                  "idle_conns": args.idle_conns, "idle_every_s": args.idle_every,
                  "idle_conns_at_end": [len(c.socks) for c in idle],
                  "idle_conns_failed": [c.failed for c in idle],
                  "churn_seconds": round(churn_s, 1),
                  "replacement_p50_s": _r(percentile(done_times, 0.5)),
                  "other_containers": others, **host, "app_grace_s": grace,
                  "accept_queues": sampler.accept_queue,
                  "load": f"wrk -t1 -c{args.wrk_conns}, "
                          f"{'Connection: close' if close else 'keep-alive'}, "
                          f"{args.wrk_delay_ms} ms pause per request"}
        for mode in ("runtime-api", "reload-per-change"):
            r = res[mode]
            unanswered = max(0, int(r["sent"]) - int(r["answered"]))
            # wrk is stopped with requests in flight: up to one per connection is unanswered
            lost = max(0, unanswered - args.wrk_conns)
            failed = lost + int(r["bad_status"])
            requests = int(r["requests"])
            row: dict[str, Any] = {
                "name": "churn_failed_requests", "backend": backend, "mode": mode,
                "n": requests, "failed": failed, "lost": lost, "unanswered": unanswered,
                "bad_status": int(r["bad_status"]), "sent": int(r["sent"]),
                "wrk_errors": {k: r[k] for k in ("connect", "read", "write", "status",
                                                 "timeout")},
                "p50_ms": _r(r["p50_us"] / 1000), "p99_ms": _r(r["p99_us"] / 1000),
                "max_ms": _r(r["max_us"] / 1000),
                "percentiles_ms": {k: _r(v / 1000) for k, v in r["percentiles_us"].items()},
                "rate_per_s": round(requests / max(r["duration_us"] / 1e6, 1e-9)),
                "haproxy_reloads": reloads[mode], "old_workers_at_end": old_at_end[mode],
                "old_workers_peak": sampler.peak_old.get(mode),
                "old_workers_peak_rss_mib": round(sampler.peak_old_rss_kib.get(mode, 0) / 1024,
                                                  1),
                "haproxy_peak_rss_mib": round(sampler.peak_rss_kib.get(mode, 0) / 1024, 1),
                "cpu_s": round(ticks[mode] / CLK_TCK, 2),
                "cpu_ms_per_change": round(ticks[mode] / CLK_TCK * 1000 / changes, 1),
                "target": f"0 failed of >= {TARGET_CHURN_MIN_REQUESTS}",
                "pass": failed == 0 and requests >= TARGET_CHURN_MIN_REQUESTS, **common}
            if mode == "reload-per-change":
                row["baseline_tuning"] = base_stats.get("tuning")
                row["baseline_changes"] = base_stats.get("changes")
                row["baseline_passes"] = base_stats.get("passes")
                pass_ms = base_stats.get("pass_ms") or []
                row["baseline_render_to_reloaded_p50_ms"] = _r(percentile(pass_ms, 0.5))
                row["baseline_render_to_reloaded_p99_ms"] = _r(percentile(pass_ms, 0.99))
                row["pass"] = None  # the baseline is a comparison, not held to the target
            report.emit(row)
        report.save(f"churn-{load}", backend, mark, {
            "replacement_s": [round(v, 3) for v in done_times],
            "baseline_pass_ms": base_stats.get("pass_ms"),
            "baseline_reload_ms": base_stats.get("reload_ms"),
            "wrk": res})



# --------------------------------------------------------------------------- main



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="propagation,churn,scale",
                    help="comma-separated: propagation, churn, scale (default: all)")
    ap.add_argument("--backends", default="etcd,zk", help="for propagation (default etcd,zk)")
    ap.add_argument("--events", type=int, default=50, help="add/drain events per backend")
    ap.add_argument("--health-interval", type=float, default=0.5,
                    help="Docker HEALTHCHECK interval of the measured containers (s)")
    ap.add_argument("--grace", type=float, default=1.5,
                    help="propagation: the app answers this long after SIGTERM (s)")
    ap.add_argument("--poll-pause", type=float, default=0.0005, help="poller pause (s)")
    ap.add_argument("--watcher-log-level", default="info",
                    help="propagation: the watcher's --log-level (debug: per-change timings)")
    ap.add_argument("--drained-after", type=int, default=30,
                    help="drained = this many responses in a row from other instances")
    ap.add_argument("--churn-backend", default="etcd")
    ap.add_argument("--replacements", type=int, default=100)
    ap.add_argument("--churn-pool", type=int, default=4)
    ap.add_argument("--churn-parallel", type=int, default=1)
    ap.add_argument("--churn-grace", type=float, default=1.0,
                    help="churn: the app answers this long after SIGTERM; 0 = the stock "
                         "example app, which exits at once")
    ap.add_argument("--churn-loads", default="keep-alive,close",
                    help="churn: one run per load, comma-separated: keep-alive (HTTP/1.1 "
                         "keep-alive), close (wrk sends 'Connection: close'); default both")
    ap.add_argument("--baseline-tuning", choices=("best", "plain"), default="best",
                    help="churn: reload_per_change.py --tuning (default best)")
    ap.add_argument("--idle-conns", type=int, default=8,
                    help="churn: long-lived idle keep-alive connections to each HAProxy at the "
                         "start")
    ap.add_argument("--idle-every", type=float, default=0.5,
                    help="churn: then one more every this many seconds (0: none), at most 200")
    ap.add_argument("--churn-timeout", type=float, default=300.0)
    ap.add_argument("--wrk-conns", type=int, default=8)
    ap.add_argument("--wrk-delay-ms", type=int, default=4)
    ap.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs)")
    # scale.py's options, so that `routing.py` runs the scale phase the same way
    import scale

    scale.add_arguments(ap)
    args = ap.parse_args(argv)
    for v, lo, hi, what in ((args.events, 1, 500, "--events"),
                            (args.replacements, 1, 1000, "--replacements"),
                            (args.churn_pool, 1, 16, "--churn-pool"),
                            (args.churn_parallel, 1, 8, "--churn-parallel"),
                            (args.wrk_conns, 1, 64, "--wrk-conns"),
                            (args.idle_conns, 0, 256, "--idle-conns")):
        if not lo <= v <= hi:
            ap.error(f"{what} must be in {lo}..{hi}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if phases - {"propagation", "churn", "scale"}:
        raise SystemExit(f"unknown phase(s): {sorted(phases - {'propagation', 'churn', 'scale'})}")
    for tool in ("wrk",) if "churn" in phases else ():
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y wrk hey "
                             "(or DISCOVERY_BENCH=1 bash scripts/setup.sh)")
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="discovery-routing-"))
    report = Report(args.json_out)
    run = Run(args=args, work=work, report=report)
    code = 0
    say(f"work dir {work}; session label {TEST_LABEL}={SESSION_ID}")
    try:
        if phases & {"propagation", "churn"}:
            run.client = docker.from_env(timeout=60)
            run.image = build_example_image(run.client)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if "propagation" not in phases:
            backends = []
        if "churn" in phases and args.churn_backend not in backends:
            backends.append(args.churn_backend)
        for backend in backends:
            server: ServerCluster | None = None
            try:
                say(f"{backend}: starting a single-node server")
                server = start_server(backend, work)
                if "propagation" in phases and backend in args.backends.split(","):
                    run_propagation(run, backend, server)
                if "churn" in phases and backend == args.churn_backend:
                    for load in args.churn_loads.split(","):
                        if load.strip() not in LOADS:
                            raise Unmeasured(f"--churn-loads: unknown load {load!r}")
                        run_churn(run, backend, server, load.strip())
            except (Unmeasured, DiscoveryError, docker.errors.DockerException, OSError) as exc:
                say(f"{backend}: NOT MEASURED: {exc}")
                report.unmeasured.append(f"{backend}: {str(exc).splitlines()[0][:200]}")
                code = 2
            finally:
                if server is not None:
                    server.stop()
        if "scale" in phases:
            import scale

            try:
                scale.run_scale(args, work, report)
            except (Unmeasured, DiscoveryError, OSError) as exc:
                say(f"scale: NOT MEASURED: {exc}")
                report.unmeasured.append(f"scale: {str(exc).splitlines()[0][:200]}")
                code = 2
    except Interrupted:
        say("interrupted: cleaning up")
        return 130
    finally:
        if run.client is not None:
            with contextlib.suppress(Exception):
                cleanup_session_containers(run.client)
            run.client.close()
        print(summary(report), flush=True)
        if args.keep_logs or code == 2:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if code == 0 and report.failed():
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
