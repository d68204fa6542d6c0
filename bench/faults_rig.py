"""``bench/faults.py``'s rig: the client load through HAProxy, a poller of the registry, and one
backend's cluster, agent, watcher and containers, each reaching the members through a
``TcpProxy`` of its own (so that a link can be cut, stalled or slowed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import secrets
import signal
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import docker.errors  # binds ``docker`` too
from common import _r, percentile, say
from procs import Daemon, Routed, discovery_cmd, http_get, wait_until
from routing_rig import Containers, app_labels

from discovery.registry import Registry, open_registry
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.util import free_port

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
