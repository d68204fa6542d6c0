#!/usr/bin/env python3
"""The fault matrix (issue 10 §3) under steady load, on a 3-member etcd cluster and a 3-member
ZooKeeper ensemble.

Per backend (``--backends``, one after the other), on loopback: the cluster
(``tests/harness/servers.py``), one ``discovery agent`` (``--ttl``, 5 s by default) and one
``discovery watch`` (its own HAProxy, one service ``ft-<random>``), each reaching every member
through its own ``TcpProxy`` (so a link can be cut, stalled or slowed), ``--instances`` (4)
example-app containers the agent checks itself (``tcp``, every 250 ms), and ``--clients`` (4)
client threads sending ``GET /`` through HAProxy, a new connection per request, ``--pause``
between requests (bounded by ``--max-requests`` and the run's time limit). A poller in the bench
reads the registry directly (not through the proxies) every 100 ms.

Then each fault of ``--faults``, one after the other, only once everything is registered and
served again. For each: the requests that failed of those sent (connection error, timeout after
``--request-timeout``, or a status other than 200) from the injection until the end of its
window; **serving again** (first answered request after the last failed one, from the
injection); **registry complete** (the first registry read holding every expected instance,
from the heal: the link back, the server restarted); **routed** (every expected instance has
answered through HAProxy, from the heal); and, after waiting ``--ttl`` + 1 s past the heal (so
that a lease or session that was not taken over has expired), the instances **lost** (expected
but not in the registry) and **stale** (in the registry, not expected).

Output: one JSON object per fault on stdout, then a table; raw results in
``bench/results/faults-<backend>.json`` (with ``--faults``, its rows are merged into the file
by fault name: the other faults' rows stay). Exit 0 when every target is met, 1 when one is missed,
2 when something could not be measured, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import docker.errors  # noqa: E402  (binds ``docker`` too)
from common import (  # noqa: E402
    RESULTS,
    Daemon,
    HostLoad,
    Interrupted,
    Report,
    Routed,
    Unmeasured,
    _r,
    children_of,
    discovery_cmd,
    http_get,
    install_signal_handlers,
    percentile,
    say,
    wait_until,
)
from routing import Containers, app_labels, other_containers  # noqa: E402

from discovery.errors import DiscoveryError  # noqa: E402
from discovery.registry import Registry, RegistryURL, open_registry  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    TEST_LABEL,
    build_example_image,
    cleanup_session_containers,
)
from tests.harness.servers import EtcdCluster, ServerCluster, TcpProxy, ZkEnsemble  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

REGISTRY_BACK_WITHIN_S = 2.0  # partition / session expiry: instances back within 2 s of the link
# SIGABRT makes a stuck agent or watcher write every thread's stack to its log
FAULTHANDLER = {"PYTHONFAULTHANDLER": "1"}


def now() -> float:
    return time.monotonic()


def sleep_until(t: float) -> None:
    """The fault's own window (a server down, a link cut): wait until monotonic time ``t``."""
    while (left := t - now()) > 0:
        time.sleep(min(left, 0.2))


# --------------------------------------------------------------------------- load


class Load:
    """``clients`` threads sending ``GET /`` on a new connection each, ``pause`` s apart, until
    stopped, ``max_requests`` in all or ``max_seconds``. Keeps every completion time (negative:
    failed), the latency of each answered request, the failures' kinds and when each instance
    (the body: the app answers its NAME) last answered."""

    def __init__(self, port: int, *, clients: int, pause: float, timeout: float,
                 max_requests: int, max_seconds: float) -> None:
        self.port, self.pause, self.timeout = port, pause, timeout
        self.max_requests, self.deadline = max_requests, now() + max_seconds
        self.times = array("d")
        self.latency_ms = array("d")  # of answered requests, aligned with ok_times
        self.ok_times = array("d")
        self.kinds: list[tuple[float, str]] = []
        self.last_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"client-{i}")
                         for i in range(clients)]

    def start(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.times) < self.max_requests \
                and now() < self.deadline:
            t0 = now()
            kind, body = "", ""
            try:
                status, body = http_get(self.port, timeout=self.timeout)
                if status != 200:
                    kind = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:  # HTTPException: cut short
                kind = type(exc).__name__
            t1 = now()
            with self._lock:
                if kind:
                    self.times.append(-t1)
                    if len(self.kinds) < 100_000:
                        self.kinds.append((t1, kind))
                else:
                    self.times.append(t1)
                    self.ok_times.append(t1)
                    self.latency_ms.append((t1 - t0) * 1000)
                    self.last_seen[body] = t1
            self._stop.wait(self.pause)

    def served_since(self, names: Sequence[str], t: float) -> bool:
        with self._lock:
            return all(self.last_seen.get(n, 0.0) >= t for n in names)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """What happened to the requests completed in [t0, t1]."""
        with self._lock:
            times = [t for t in self.times if t0 <= abs(t) <= t1]
            lat = [ms for t, ms in zip(self.ok_times, self.latency_ms, strict=True)
                   if t0 <= t <= t1]
            kinds = Counter(k for t, k in self.kinds if t0 <= t <= t1)
        failed = [-t for t in times if t < 0]
        out: dict[str, Any] = {
            "requests": len(times), "failed": len(failed), "failure_kinds": dict(kinds),
            "p50_ms": _r(percentile(lat, 0.5)), "p99_ms": _r(percentile(lat, 0.99)),
            "max_ms": _r(max(lat)) if lat else None, "serving_again_s": 0.0,
            "failed_from_s": None, "failed_until_s": None,
            "failure_times_s": [round(t - t0, 3) for t in failed[:200]]}
        if failed:
            last = max(failed)
            after = [t for t in times if t > last]
            out["failed_from_s"] = round(min(failed) - t0, 3)
            out["failed_until_s"] = round(last - t0, 3)
            out["serving_again_s"] = round(after[0] - t0, 3) if after else None
        return out

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 2)


# --------------------------------------------------------------------------- registry


class RegistryPoller:
    """Reads the service from the registry every ``period`` s, straight from the members (not
    through the proxies): the container ids (12 characters) it holds, or None (unreadable)."""

    def __init__(self, url: str, service: str, period: float = 0.1) -> None:
        self.service, self.period = service, period
        self.reg: Registry = open_registry(url, timeout=2.0)
        self.samples: list[tuple[float, frozenset[str] | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="registry-poller")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                snap = self.reg.snapshot([self.service])
                ids: frozenset[str] | None = frozenset(
                    i.container_id[:12] for i in snap.instances.values())
            except Exception:
                ids = None
            with self._lock:
                self.samples.append((now(), ids))
            self._stop.wait(self.period)

    def since(self, t: float) -> list[tuple[float, frozenset[str] | None]]:
        with self._lock:
            return [s for s in self.samples if s[0] >= t]

    def complete_throughout(self, t: float, expected: frozenset[str]) -> bool:
        """Every read since ``t`` succeeded and held ``expected`` (and there was one)."""
        got = self.since(t)
        return bool(got) and all(ids is not None and expected <= ids for _, ids in got)

    def first_complete(self, t: float, expected: frozenset[str]) -> float | None:
        for ts, ids in self.since(t):
            if ids is not None and expected <= ids:
                return ts
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.reg.close(revoke=False)


# --------------------------------------------------------------------------- the rig


@dataclass
class Fault:
    """One injected fault: when it began, when it was healed (the link back, the server
    restarted; the same moment for a one-off like a SIGKILL), what was seen meanwhile."""

    t_inject: float
    t_heal: float
    notes: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], None] | None = None  # run once the row is measured


@dataclass
class Rig:
    """One backend's cluster, proxies, agent, watcher, containers, load and poller."""

    args: argparse.Namespace
    backend: str
    work: Path
    client: docker.DockerClient
    image: str
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    expected: dict[str, str] = field(default_factory=dict)  # container name -> id
    retired: list[str] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)  # per fault, for the raw result
    n: int = 0

    cluster: ServerCluster = field(init=False)
    agent_proxies: list[TcpProxy] = field(init=False)
    watcher_proxies: list[TcpProxy] = field(init=False)
    agent: Daemon = field(init=False)
    watcher: Routed = field(init=False)
    containers: Containers = field(init=False)
    poller: RegistryPoller = field(init=False)
    load: Load = field(init=False)
    port: int = field(init=False)

    @property
    def service(self) -> str:
        return f"ft-{self.token}"

    @property
    def prefix(self) -> str:
        return f"/bench-faults-{self.token}-{self.backend}"

    def _url(self, ports: Sequence[int]) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        return f"{self.backend}://{hosts}{self.prefix}"

    def up(self) -> None:
        args, stack = self.args, self.stack
        say(f"{self.backend}: starting a 3-member cluster")
        self.cluster = (EtcdCluster if self.backend == "etcd" else ZkEnsemble)(
            3, self.work / f"{self.backend}-cluster")
        stack.callback(self.cluster.stop)
        self.cluster.start()
        self.agent_proxies = [TcpProxy(self.cluster.address(i)) for i in range(3)]
        self.watcher_proxies = [TcpProxy(self.cluster.address(i)) for i in range(3)]
        for p in (*self.agent_proxies, *self.watcher_proxies):
            stack.callback(p.close)
        self.poller = RegistryPoller(self.cluster.url(self.prefix), self.service)
        stack.callback(self.poller.close)
        self.agent = Daemon(discovery_cmd(
            "agent", "--registry", self._url([p.port for p in self.agent_proxies]),
            "--node", f"ft-{self.backend}-{self.token}", "--ttl", f"{args.ttl:g}"),
            self.work / f"agent-{self.backend}.log", env=FAULTHANDLER).start()
        stack.callback(self.agent.stop)
        self.port = free_port()
        self.watcher = Routed.watcher(self._url([p.port for p in self.watcher_proxies]),
                                      {self.service: self.port}, self.work)
        self.watcher.env.update(FAULTHANDLER)
        self.watcher.start()
        stack.callback(self.watcher.close)
        self.watcher.wait_ready([self.port])
        self.containers = Containers(self.client, self.image)
        stack.callback(self.containers.close)
        for _ in range(args.instances):
            self.add_container()
        self.load = Load(self.port, clients=args.clients, pause=args.pause,
                         timeout=args.request_timeout, max_requests=args.max_requests,
                         max_seconds=args.max_minutes * 60 + 120).start()
        stack.callback(self.load.stop)
        self.steady(90.0)

    def add_container(self, tag: str = "") -> str:
        self.n += 1
        name = f"ft-{self.backend}-{self.n}{tag}-{self.token}"
        port = free_port()
        cid = self.containers.start(name, port, app_labels(self.service, port, check="tcp"),
                                    grace=self.args.grace)
        self.expected[name] = cid
        return name

    def retire_container(self, name: str) -> None:
        """``docker kill -s TERM``: the app keeps answering ``--grace`` s (it drains)."""
        cid = self.expected.pop(name)
        self.retired.append(name)
        self.containers.stop_signal(cid, self.args.grace + 2.0)

    def expected_ids(self) -> frozenset[str]:
        return frozenset(cid[:12] for cid in self.expected.values())

    def steady(self, timeout: float = 30.0) -> None:
        """Every expected instance in the registry and answering through HAProxy, and 1 s
        without a failed request."""
        t = now()
        wait_until(lambda: self.poller.first_complete(t, self.expected_ids()), timeout,
                   f"{self.backend}: every instance registered", interval=0.1)
        t = now()
        wait_until(lambda: self.load.served_since(list(self.expected), t), timeout,
                   f"{self.backend}: every instance served", interval=0.1)
        wait_until(lambda: self.load.window(now() - 1.0, now())["failed"] == 0
                   and self.load.window(now() - 1.0, now())["requests"] > 0, timeout,
                   f"{self.backend}: 1 s without a failed request", interval=0.2)

    def unstick(self) -> str:
        """Not steady before a fault: SIGABRT the agent (its threads' stacks go to its log),
        start it again and wait for steady. Returns what was done, for the next row."""
        say(f"{self.backend}: not steady; SIGABRT to the agent (stacks in "
            f"{self.agent.log_path.name}) and a new one")
        self.agent.stop(signal.SIGABRT, timeout=10.0)
        self.agent.start()
        self.steady(60.0)
        return "the agent did not recover from the previous fault: SIGABRTed and restarted"

    def close(self) -> None:
        self.stack.close()


# --------------------------------------------------------------------------- the faults


def f_leader_kill(rig: Rig) -> Fault:
    """SIGKILL the cluster's leader; start it again ``--leader-down`` s later."""
    c = rig.cluster
    leader = c.wait_leader(30)
    t0 = now()
    c.kill_member(leader)
    new = c.wait_leader(30)
    elected = now() - t0
    sleep_until(t0 + rig.args.leader_down)
    c.start_member(leader, wait=False)
    t_heal = now()
    c.wait_ready()
    return Fault(t0, t_heal, {"killed_member": leader, "new_leader": new,
                              "new_leader_after_s": round(elected, 2),
                              "down_s": rig.args.leader_down})


def f_cluster_down(rig: Rig) -> Fault:
    """SIGKILL every member; start a container meanwhile; start them all ``--outage`` s later."""
    c = rig.cluster
    t0 = now()
    for p in c.procs:  # all at once
        p.signal(signal.SIGKILL)
    for i in range(c.size):
        c.kill_member(i)  # reaps it
    name = rig.add_container("-outage")
    sleep_until(t0 + rig.args.outage)
    for i in range(c.size):
        c.start_member(i, wait=False)
    t_heal = now()
    c.wait_ready()
    return Fault(t0, t_heal, {"down_s": rig.args.outage, "started_meanwhile": name,
                              "cluster_serving_after_s": round(now() - t_heal, 2)})


def _agent_links(rig: Rig, how: Callable[[TcpProxy], contextlib.AbstractContextManager[None]],
                 window: float, what: str, start_one: bool = False) -> Fault:
    """Every link of the agent (to each member) stalled or refused for ``window`` s; with
    ``start_one``, a container is started 1 s into it (its registration waits for the link)."""
    t0 = now()
    notes: dict[str, Any] = {"cut_s": window, "how": what}
    with contextlib.ExitStack() as stack:
        for p in rig.agent_proxies:
            stack.enter_context(how(p))
        if start_one:
            sleep_until(t0 + 1.0)
            notes["started_meanwhile"] = rig.add_container("-cut")
        sleep_until(t0 + window)
    return Fault(t0, now(), notes)


def f_agent_partition(rig: Rig) -> Fault:
    """The agent's links to every member stall (no reset: a partition) for TTL + 3 s; a
    container is started meanwhile."""
    return _agent_links(rig, TcpProxy.stalled, rig.args.ttl + 3.0, "stalled links (no reset)",
                        start_one=True)


def f_session_expiry(rig: Rig) -> Fault:
    """ZooKeeper: the agent's links refuse connections for the session timeout + 2 s, so the
    ensemble expires its session; it comes back to an expired session."""
    return _agent_links(rig, TcpProxy.blocked, rig.args.ttl + 2.0, "links refused (reset)")


def f_registry_latency(rig: Rig) -> Fault:
    """Every registry link (agent's and watcher's) delayed ``--latency-ms`` per round trip
    for ``--latency-seconds``; meanwhile one instance is added and one retired."""
    args = rig.args
    proxies = [*rig.agent_proxies, *rig.watcher_proxies]
    t0 = now()
    for p in proxies:
        p.delay = args.latency_ms / 2000.0  # each way
    try:
        t_add = now()
        name = rig.add_container("-slow")
        served = wait_until(lambda: rig.load.last_seen.get(name), 30.0, f"{name} served",
                            interval=0.02)
        oldest = next(iter(rig.expected))
        t_retire = now()
        rig.retire_container(oldest)
        wait_until(lambda: now() - rig.load.last_seen.get(oldest, 0.0) > 0.5
                   or now() - t_retire > args.grace + 1, args.grace + 5, f"{oldest} drained",
                   interval=0.05)
        last = rig.load.last_seen.get(oldest, t_retire)
        sleep_until(t0 + args.latency_seconds)
    finally:
        for p in proxies:
            p.delay = 0.0
    return Fault(t0, now(), {"latency_ms": args.latency_ms, "window_s": args.latency_seconds,
                             "added_started_to_served_s": round(served - t_add, 2),
                             "retired_term_to_last_served_s": round(last - t_retire, 2)})


def f_agent_kill(rig: Rig) -> Fault:
    """SIGKILL the agent; start the same command ``--agent-down`` s later (within the TTL)."""
    t0 = now()
    rig.agent.stop(signal.SIGKILL)
    sleep_until(t0 + rig.args.agent_down)
    rig.agent.start()
    return Fault(t0, now(), {"down_s": rig.args.agent_down})


def f_watcher_kill(rig: Rig) -> Fault:
    """SIGKILL the watcher (its HAProxy runs on); start the same command at once."""
    old = rig.watcher.haproxy_master_pid()
    t0 = now()
    rig.watcher.stop(signal.SIGKILL)
    rig.watcher.start()
    return Fault(t0, now(), {"haproxy_master_before": old})  # adopted: the same at the end


def f_watcher_upgrade(rig: Rig) -> Fault:
    """Stop the watcher with ``--upgrade-signal`` (the handover signal, once there is one),
    wait for it to exit, start the new one (the same command)."""
    sig = signal.Signals[f"SIG{rig.args.upgrade_signal.upper().removeprefix('SIG')}"]
    old = rig.watcher.haproxy_master_pid()
    t0 = now()
    code = rig.watcher.stop(sig, timeout=30.0)
    exited = now() - t0
    rig.watcher.start()
    return Fault(t0, now(), {"signal": sig.name, "old_exit_code": code,
                             "old_exited_after_s": round(exited, 2),
                             "haproxy_master_before": old})


def f_haproxy_worker_kill(rig: Rig) -> Fault:
    """SIGKILL the HAProxy worker (the master's newest child)."""
    master = rig.watcher.haproxy_master_pid()
    workers = sorted(children_of(master)) if master else []
    if not workers:
        raise Unmeasured(f"no HAProxy worker under master {master}")
    t0 = now()
    os.kill(workers[-1], signal.SIGKILL)
    return Fault(t0, t0, {"worker": workers[-1], "haproxy_master_before": master,
                          "haproxy_master_after": rig.watcher.haproxy_master_pid()})


def f_lease_revoke(rig: Rig) -> Fault:
    """etcd: revoke the agent's lease on the cluster, as a stuck leader does (etcd #15247)."""
    import pyetcd

    host, port = rig.cluster.address(0)
    client = pyetcd.client(host, port, timeout=5)
    try:
        prefix = RegistryURL.parse(rig.cluster.url(rig.prefix)).prefix
        leases = {kv.lease for kv in client.get_prefix_response(prefix).kvs if kv.lease}
        t0 = now()
        for lease in leases:
            client.revoke_lease(lease)
    finally:
        client.close()
    return Fault(t0, t0, {"leases_revoked": len(leases)})


def _dockerd_restart(rig: Rig, live_restore: bool) -> Fault:
    """Restart dockerd with its own flags (it disrupts every other session's containers:
    ``--include-dockerd``). Without live-restore dockerd stops the containers; the bench
    starts them again once it is back, as a restart policy or an operator would. With it,
    live-restore is turned on *before* the measured restart without stopping anything
    (``daemon.json`` + SIGHUP, unmeasured) and turned off the same way after, even on
    failure: dockerd is left exactly as it was."""
    from tests.harness import dockerd as hd

    try:
        with contextlib.ExitStack() as stack:
            if live_restore:
                stack.enter_context(hd.live_restore())
            elif hd.live_restore_enabled():
                raise Unmeasured("dockerd runs with live-restore: no restart without it")
            t0 = now()
            hd.restart_dockerd(timeout=120.0)  # the old daemon's own command line
            back = now() - t0
            enabled = hd.live_restore_enabled()
    except AssertionError as exc:  # a harness wait that timed out
        raise Unmeasured(str(exc)) from exc
    if enabled != live_restore:
        raise Unmeasured(f"dockerd came back with live-restore {enabled}, not {live_restore}")
    running = {c.id for c in rig.client.containers.list(
        filters={"label": f"{TEST_LABEL}={SESSION_ID}"})}
    still = sum(cid in running for cid in rig.expected.values())
    restarted = 0
    for cid in rig.expected.values():
        if cid not in running:
            with contextlib.suppress(docker.errors.APIError):
                rig.client.api.start(cid)
                restarted += 1
    return Fault(t0, now(), {"live_restore": live_restore,
                             "dockerd_back_after_s": round(back, 2),
                             "containers_still_running": still,
                             "containers_started_again": restarted})


def f_dockerd_restart(rig: Rig) -> Fault:
    return _dockerd_restart(rig, live_restore=False)


def f_dockerd_restart_live(rig: Rig) -> Fault:
    return _dockerd_restart(rig, live_restore=True)


@dataclass(frozen=True)
class Spec:
    what: str
    run: Callable[[Rig], Fault]
    backends: tuple[str, ...] = ("etcd", "zk")
    max_failed: int | None = 0  # None: failures expected, not a target
    registry_back_within: float | None = None


FAULTS: dict[str, Spec] = {
    "registry-latency": Spec("registry latency +200 ms (one add, one removal meanwhile)",
                             f_registry_latency),
    "agent-kill": Spec("agent SIGKILL + restart", f_agent_kill),
    "watcher-kill": Spec("watcher SIGKILL + restart", f_watcher_kill),
    "watcher-upgrade": Spec("watcher upgrade (stop, start the new one)", f_watcher_upgrade),
    "haproxy-worker-kill": Spec("HAProxy worker SIGKILL", f_haproxy_worker_kill,
                                max_failed=None),
    "lease-revoke": Spec("the agent's lease revoked", f_lease_revoke, backends=("etcd",)),
    "leader-kill": Spec("leader SIGKILL, back after 6 s", f_leader_kill),
    "session-expiry": Spec("the agent's session expired", f_session_expiry, backends=("zk",),
                           registry_back_within=REGISTRY_BACK_WITHIN_S),
    "agent-partition": Spec("agent cut off from the registry for TTL + 3 s, a container "
                            "started meanwhile",
                            f_agent_partition, registry_back_within=REGISTRY_BACK_WITHIN_S),
    "cluster-down": Spec("whole cluster down 15 s, a container started meanwhile",
                         f_cluster_down),
    # without live-restore dockerd itself stops the apps: requests fail until they are
    # started again, whatever discovery does (no 0-failure target; nothing may be lost)
    "dockerd-restart": Spec("dockerd restart (no live-restore)", f_dockerd_restart,
                            max_failed=None),
    "dockerd-restart-live-restore": Spec("dockerd restart with live-restore",
                                         f_dockerd_restart_live),
}
DOCKERD_FAULTS = ("dockerd-restart", "dockerd-restart-live-restore")


# --------------------------------------------------------------------------- measuring


def measure(rig: Rig, name: str, spec: Spec, report: Report, before_note: str = ""
            ) -> dict[str, Any]:
    """Inject ``name``, wait for the recovery, emit its row (``before_note``: what had to be
    done to make the rig steady first)."""
    args = rig.args
    before = rig.expected_ids()
    host = HostLoad().start()
    cpu0 = os.times()
    others = other_containers(rig.client)
    say(f"{rig.backend}: {name}: {spec.what}")
    fault = spec.run(rig)
    expected, names = rig.expected_ids(), list(rig.expected)
    heal = fault.t_heal
    give_up = heal + args.recovery_timeout
    routed: list[float] = []

    def watch_routed() -> None:
        while now() < give_up and not routed:
            if rig.load.served_since(names, heal):
                routed.append(now())
            time.sleep(0.02)

    threading.Thread(target=watch_routed, daemon=True, name="routed").start()
    # a lease or session that was not taken over expires TTL after the fault: wait past it,
    # then until the registry has been complete, everything served and nothing failed for 1 s
    sleep_until(max(heal + args.settle, fault.t_inject + args.ttl + 1.5))
    while now() < give_up:
        t = now()
        if (rig.poller.complete_throughout(t - 1.0, expected) and routed
                and rig.load.window(t - 1.0, t)["failed"] == 0):
            break
        time.sleep(0.1)
    t_end = now()
    window = rig.load.window(fault.t_inject, t_end)
    polled = [(t, ids) for t, ids in rig.poller.since(fault.t_inject) if t <= t_end]
    kept = before & expected  # what was registered before and should still be
    missing = [len(kept - ids) for _, ids in polled if ids is not None]
    unreadable = [t for t, ids in polled if ids is None]
    final = next((ids for _, ids in reversed(polled) if ids is not None), None)
    # registry complete: from the heal until the first read of the streak of complete reads
    # that lasts to the end of the window (a later loss counts, not the first good read)
    reg_at: float | None = None
    for t, ids in polled:
        if ids is not None and expected <= ids:
            reg_at = reg_at if reg_at is not None else t
        else:
            reg_at = None
    reg_s = None if reg_at is None else round(max(reg_at - heal, 0.0), 2)
    lost = None if final is None else sorted(expected - final)
    stale = None if final is None else sorted(final - expected)
    ok = (lost == [] and reg_s is not None and bool(routed)
          and (spec.max_failed is None or window["failed"] <= spec.max_failed)
          and (spec.registry_back_within is None or reg_s <= spec.registry_back_within))
    target = "nothing lost" if spec.max_failed is None else "0 failed, nothing lost"
    if spec.registry_back_within is not None:
        target += f", registry complete <= {spec.registry_back_within:g} s after the link"
    cpu1 = os.times()
    row = report.emit({
        "fault": name, "what": spec.what, "backend": rig.backend,
        "failed": window["failed"], "requests": window["requests"],
        "serving_again_s": window["serving_again_s"],
        "registry_complete_s": reg_s,
        "routed_all_s": round(max(routed[0] - heal, 0.0), 2) if routed else None,
        "lost": None if lost is None else len(lost), "stale": None if stale is None else len(stale),
        "missing_peak": max(missing, default=None),
        "registry_unreadable_s": (round(unreadable[-1] - unreadable[0] + 0.1, 1)
                                  if unreadable else 0.0),
        "heal_after_s": round(heal - fault.t_inject, 2),
        "window_s": round(t_end - fault.t_inject, 1),
        "p50_ms": window["p50_ms"], "p99_ms": window["p99_ms"], "max_ms": window["max_ms"],
        "failed_from_s": window["failed_from_s"], "failed_until_s": window["failed_until_s"],
        "failure_kinds": window["failure_kinds"], "instances": len(expected),
        "haproxy_master_at_end": rig.watcher.haproxy_master_pid(),
        "bench_cpu_pct_of_one_core": round(100 * (cpu1.user + cpu1.system - cpu0.user
                                                  - cpu0.system) / max(t_end - fault.t_inject,
                                                                       1e-9), 1),
        "other_containers": others, **host.read(), **fault.notes,
        **({"before": before_note} if before_note else {}), "target": target, "pass": ok})
    rig.samples[name] = {
        "failure_times_s": window["failure_times_s"],
        "registry_missing": [(round(t - fault.t_inject, 2),
                              None if ids is None else len(kept - ids)) for t, ids in polled],
        "lost_ids": lost, "stale_ids": stale}
    if fault.after is not None:
        fault.after()
    return row


def run_backend(args: argparse.Namespace, backend: str, names: list[str], work: Path,
                client: docker.DockerClient, image: str, report: Report) -> int:
    """Every fault of ``names`` on ``backend``; 2 when something could not be measured."""
    mark = report.mark()
    rig = Rig(args=args, backend=backend, work=work, client=client, image=image)
    code = 0
    deadline = now() + args.max_minutes * 60
    try:
        rig.up()
        for name in names:
            if now() > deadline:
                report.unmeasured.append(f"{backend} {name}: --max-minutes reached")
                code = 2
                continue
            try:
                before = ""
                try:
                    rig.steady()
                except Unmeasured:
                    before = rig.unstick()
                measure(rig, name, FAULTS[name], report, before)
            except (Unmeasured, DiscoveryError, docker.errors.DockerException, OSError,
                    RuntimeError) as exc:
                say(f"{backend} {name}: NOT MEASURED: {exc}")
                report.unmeasured.append(f"{backend} {name}: {str(exc).splitlines()[0][:200]}")
                code = 2
    except (Unmeasured, DiscoveryError, docker.errors.DockerException, OSError,
            RuntimeError) as exc:
        say(f"{backend}: NOT MEASURED: {exc}")
        report.unmeasured.append(f"{backend}: {str(exc).splitlines()[0][:200]}")
        code = 2
    finally:
        load = getattr(rig, "load", None)
        total = len(load.times) if load is not None else 0
        rig.close()
    if len(report.rows) > mark[0]:
        path = RESULTS / f"faults-{backend}.json"
        previous = (json.loads(path.read_text())
                    if args.faults and path.exists() else None)  # a subset: merged into it
        report.save("faults", backend, mark, {
            "faults": rig.samples, "total_requests": total,
            "setup": {"members": 3, "instances": args.instances, "clients": args.clients,
                      "pause_s": args.pause, "ttl_s": args.ttl,
                      "request_timeout_s": args.request_timeout},
            "not_measured": [u for u in report.unmeasured if u.startswith(backend)]})
        if previous is not None:
            merge_into(path, previous, names)
    return code


def merge_into(path: Path, previous: dict[str, Any], names: Sequence[str]) -> None:
    """A run of some faults (``--faults``) must not drop the others from the saved result:
    its rows replace those of the same fault in ``previous`` (the file as it was), the rest
    stay as measured. The file keeps the earlier run's command and machine; each new row
    says which run measured it (``run``), and ``later_runs`` lists those runs."""
    doc = json.loads(path.read_text())
    run = {"command": doc["command"], "started_utc": doc["started_utc"],
           "finished_utc": doc["finished_utc"], "commit": doc["machine"].get("commit"),
           "loadavg_at_start": doc["machine"].get("loadavg_at_start"), "faults": list(names)}
    new_rows = {r["fault"]: {**r, "run": run} for r in doc["summary"]["rows"]}
    rows = [new_rows.pop(r["fault"], r) for r in previous["summary"]["rows"]]
    rows += new_rows.values()  # faults the earlier run did not have, in this run's order
    rows.sort(key=lambda r: list(FAULTS).index(r["fault"]) if r["fault"] in FAULTS else 99)
    old, new = previous["samples"], doc["samples"]
    merged = {**previous, "summary": {**previous["summary"], "rows": rows},
              "later_runs": [*previous.get("later_runs", []), run],
              "samples": {**old, "faults": {**old.get("faults", {}), **new["faults"]},
                          "total_requests": old.get("total_requests", 0)
                          + new["total_requests"],
                          "not_measured": [
                              u for u in old.get("not_measured", [])
                              if not any(f" {n}:" in u for n in names)]
                          + new["not_measured"]}}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True, allow_nan=False) + "\n")
    say(f"merged into {path.name}: {len(rows)} rows")


def table(report: Report) -> str:
    head = (f"{'backend':<7} {'fault':<29} {'failed/total':>14} {'serving':>8} "
            f"{'registry':>9} {'routed':>7} {'lost':>5} {'stale':>5}  pass")
    lines = ["", head, "-" * len(head)]
    for r in report.rows:
        def s(v: Any) -> str:
            return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        lines.append(f"{r['backend']:<7} {r['fault']:<29} "
                     f"{r['failed']:>6}/{r['requests']:<7} {s(r['serving_again_s']):>8} "
                     f"{s(r['registry_complete_s']):>9} {s(r['routed_all_s']):>7} "
                     f"{s(r['lost']):>5} {s(r['stale']):>5}  {r['pass']}")
    lines.append("serving: s from the fault to the first answer after the last failure; registry, "
                 "routed: s from the heal until complete")
    for what in report.unmeasured:
        lines.append(f"NOT MEASURED: {what}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="etcd,zk", help="comma-separated (default etcd,zk)")
    ap.add_argument("--faults", default="",
                    help=f"comma-separated, in this order by default: {', '.join(FAULTS)} "
                         "(each where its backend applies; the dockerd ones only with "
                         "--include-dockerd)")
    ap.add_argument("--include-dockerd", action="store_true",
                    help="also restart dockerd (without, then with live-restore): it disrupts "
                         "every other container on this host. Off by default")
    ap.add_argument("--instances", type=int, default=4, help="containers serving (default 4)")
    ap.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--pause", type=float, default=0.01,
                    help="each client's pause between requests, s (default 0.01)")
    ap.add_argument("--request-timeout", type=float, default=2.0,
                    help="a request not answered within this is failed (default 2 s)")
    ap.add_argument("--max-requests", type=int, default=2_000_000)
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="per backend: faults not begun by then are not measured (default 15)")
    ap.add_argument("--ttl", type=float, default=5.0, help="the agent's --ttl (default 5 s)")
    ap.add_argument("--grace", type=float, default=2.0,
                    help="an app answers this long after SIGTERM (default 2 s)")
    ap.add_argument("--leader-down", type=float, default=6.0)
    ap.add_argument("--outage", type=float, default=15.0, help="whole cluster down, s")
    ap.add_argument("--agent-down", type=float, default=1.0)
    ap.add_argument("--latency-ms", type=float, default=200.0,
                    help="added to every registry round trip (default 200)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--upgrade-signal", default="USR2",
                    help="how watcher-upgrade stops the old watcher: USR2 (default) exits "
                         "leaving HAProxy to the next watcher; TERM stops HAProxy too")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="after recovery, wait this long (and past TTL + 1.5 s from the fault) "
                         "before counting what is lost")
    ap.add_argument("--recovery-timeout", type=float, default=60.0)
    ap.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args(argv)
    for v, lo, hi, what in ((args.instances, 1, 16, "--instances"),
                            (args.clients, 1, 16, "--clients"),
                            (args.max_minutes, 1, 60, "--max-minutes"),
                            (args.ttl, 1, 10, "--ttl (the ZooKeeper harness allows 1..10 s)")):
        if not lo <= v <= hi:
            ap.error(f"{what} must be in {lo}..{hi}")
    if args.pause < 0.001:
        ap.error("--pause must be at least 0.001 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(backends) - {"etcd", "zk"}:
        raise SystemExit(f"unknown backend(s): {sorted(set(backends) - {'etcd', 'zk'})}")
    wanted = [f.strip() for f in args.faults.split(",") if f.strip()] or list(FAULTS)
    if set(wanted) - set(FAULTS):
        raise SystemExit(f"unknown fault(s): {sorted(set(wanted) - set(FAULTS))}")
    if not args.include_dockerd:
        wanted = [f for f in wanted if f not in DOCKERD_FAULTS]
    install_signal_handlers()
    # the bench's own registry reader: its reconnects are in the row, not on the terminal
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    logging.getLogger("discovery").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="discovery-faults-"))
    report = Report(args.json_out)
    code = 0
    client: docker.DockerClient | None = None
    say(f"work dir {work}; session label {TEST_LABEL}={SESSION_ID}")
    try:
        client = docker.from_env(timeout=60)
        image = build_example_image(client)
        for backend in backends:
            names = [f for f in wanted if backend in FAULTS[f].backends]
            code = max(code, run_backend(args, backend, names, work, client, image, report))
    except Interrupted:
        say("interrupted: cleaning up")
        return 130
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                cleanup_session_containers(client)
            client.close()
        print(table(report), flush=True)
        if args.keep_logs or code == 2:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if code == 0 and report.failed():
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
