#!/usr/bin/env python3
"""Fleet benchmark (issue 11 §3): up to 1,000 simulated hosts against a real 3-member etcd
cluster and a real 3-member ZooKeeper ensemble, on one machine.

**A simulated host** is what ``discovery up`` runs on a host, minus Docker and HAProxy, built
from the project's own code: an *agent* registry (``open_registry(url, ttl=...)``: its own
etcd lease / ZooKeeper session) that registers the host's ``--instances`` (10) instances and
every ``--resync`` seconds (±10 %, like the agent; and, like the agent, none while its
registry has been down for less than two such periods, and one at a random moment within a
period after it came back) reconciles them through
``node_snapshot(node)``, re-registering what is missing; and a *watcher* registry (a second
connection, as ``discovery up`` opens one for its watcher) that reads a snapshot of the
services the host routes and follows them with ``watch(..., services=...)`` into a
:class:`~discovery.model.catalog.Catalog` (its own watch stream). Each host routes
``--watch-services`` (5) services: ``svc000`` (every host: the change under test) and 4 others
picked at random from ``--services`` (100); each host's instances are spread over 10
consecutive services, so a service has ``10 x hosts / 100`` instances (100 at 1,000 hosts).

**Source addresses.** Host *n* has its own loopback address ``127.20.<n // 250>.<n % 250 +
1>``. ZooKeeper (whose ``maxClientCnxns`` counts connections per client address): the
host's KazooClient gets a handler whose ``create_connection`` binds that address
(``socket.create_connection(..., source_address=...)``); the bench injects it by wrapping
``discovery.registry.zk``'s ``zk_client_options`` while the host's registry is being
opened, nothing else of the backend changes. etcd: Python gRPC has no per-channel source
address, so by default the etcd hosts connect from 127.0.0.1 — etcd has no per-address limit —
but **each host with its own connection**: gRPC shares one connection among a process's
channels with equal target and arguments, so every host's channels carry their own user agent
(``discovery.registry.etcd_aio.Endpoint`` wrapped the same way: the asyncio channel of its
streams gets the same options). A host's agent and watcher share one registry client (one
session or lease; on etcd one connection for the calls and the streams), as one
``discovery up`` process does; the etcd hosts of a worker process run their streams and lease
keepers on one shared asyncio loop (``open_registry(..., loop=)``), as any process holding
many registries does. etcd
bytes are then counted per worker process and divided by its hosts. ``--etcd-relay`` gives
etcd hosts their own source addresses through one HAProxy relay (``server ... source <host
address>``, one loopback port per host and member); it measures
the steady state the same, but collapses under a full restart's reconnect storm from 500 hosts
on (docs/benchmarks.md), so it is not the default.

**Processes.** The hosts run as threads in ``--workers`` (8) worker processes (this script with
``--worker``; a ZooKeeper worker's threads are gevent greenlets, ``--zk-hosts greenlets``,
through ``bench/fleet_greenlets.py``: ~765 threads of 125 hosts contending for one GIL left
some waiting up to 15 s, long enough for their sessions to expire in a full restart, where a
host of its own has a few threads; greenlets take their turn in the order they became
ready), host n in worker n mod workers, driven over a pipe (a delivery costs a worker
more CPU the more hosts it holds: with a thread a stream, 8 processes of 100 to 150 hosts
measured 299 µs a delivery at 1,000 etcd hosts, 4 of 250 429 µs; a real host is a process of
its own); the host that dies is alone
in a process of its own, SIGKILLed (no goodbye: its lease or session must expire). The workers
run at ``--worker-nice`` (10, and the same autogroup nice, since each is a session of its own):
they stand for other machines and must not starve the registry members of CPU on this one; that
only slows the hosts' own measured timings. The three members share this machine's cores too, so
each etcd member runs with ``GOMAXPROCS=1`` (``--etcd-procs``) and each ZooKeeper member serves
requests on its selector and commit threads instead of thread pools (``--zk-io direct``).
A worker makes its full garbage collections only
between the measured phases (``--full-gc between-phases``: after each growth step, before the
steady state and before the restart it collects once and freezes what it holds, ``gc.freeze()``):
one walks the heaps of all of its hosts and holds the thread that made it for all of its run,
where a host of its own walks a heap ~1/125 the size (``--full-gc python`` leaves them to
Python: at 1,000 ZooKeeper hosts a restart then lost 264-382 sessions in the simulator, its
full collections taking at most 0.24 s of CPU but up to 14 s of wall clock).

**What is measured**, at each size of ``--sizes`` (250, 500, 1,000; the fleet grows between
sizes, the servers stay up; ``--sizes 1000 --bench-name fleet1000`` starts at 1,000):

* **steady state** over ``--steady`` s (30, one resync period): registry requests/s and
  bytes/s per host. Requests are counted by the servers (etcd: ``grpc_server_handled_total``
  of unary calls + ``grpc_server_msg_received_total`` of streams, summed over the members;
  ZooKeeper: ``zk_packets_received`` of ``mntr``, summed) and divided by the hosts; bytes at
  the client side, from the kernel (``ss -ti``: ``bytes_sent``/``bytes_received`` of every
  connection from a fleet address, or etcd worker process, to a member); reads as the
  project counts them (``Registry.reads``: keys and bytes the server returned to each host).
  ZooKeeper's ``mntr`` does not tell requests apart, so the ZooKeeper rows also count what
  the hosts sent, by type (``zk_requests``: ``Ping``, ``GetChildren``, ``MultiRead``, ...):
  ``client_requests_by_type_per_s_per_host``, and in the restart row per second from the stop
  (``client_requests_by_second``), over the peak's window and the first 10 s after serving.
* **one change → every host's catalog**: ``--changes`` (6) writes to ``svc000`` (put a new
  instance, delete it, ...) from the bench's own client; per host, the time from just before
  the write to the catalog holding it (the watch callback, on ``Catalog.apply``); p50 / p99 /
  max. Target: reaches every host, p99 <= 250 ms.
* **a host dying**: SIGKILL of the victim's process; time until none of its instances is in
  any host's catalog. Target: <= TTL + 1 s.
* **full registry restart**: every member stopped (SIGTERM) and started again; serving again
  = the bench's own first probe write that succeeds; resync = until every host's catalog has
  the probe (its watch is back), and every host's catalog then equals the registry's. Leases or
  sessions that expired meanwhile are counted (``expired_during``). Server
  request rate sampled every 0.25 s (the members read at once): peak (over the shortest window
  of 1 s or more the samples allow: ``peak_window_s``, which a member slow to answer stretches;
  over 1.5 s the peak is a lower bound and does not count as met) vs steady. Targets: every
  host resynced within 10 s of the registry serving again, peak <= 3 x steady. etcd watchers
  resume wide and return to their per-service watchers 10-60 s later (``NARROW_AFTER``), so
  before the next size the bench waits that long.
* **servers**: RSS and CPU of every member (and of the relay), data size, watches, sessions.

Raw results: ``bench/results/fleet-etcd.json``, ``fleet-zk.json`` (``--grpc-proxy``:
``fleet-proxy-etcd.json``, the hosts behind one ``etcd grpc-proxy`` instead of the members).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import logging
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HAPROXY_BIN,
    ROOT,
    Interrupted,
    Report,
    cpu_ticks,
    install_signal_handlers,
    percentile,
    rss_kib,
    say,
)
from zk_requests import RequestLog, by_type_between, merge, per_second
from zk_requests import install as count_zk_requests

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, open_registry
from discovery.registry.etcd_aio import LoopThread
from discovery.registry.etcd_watch import NARROW_AFTER
from discovery.registry.reads import ReadCounts
from discovery.retry import Outage, jittered, spread

PREFIX = "/fleet"
HOT = "svc000"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FULL_GC_NEVER = 10**9  # gen-2 threshold (full collections after this many gen-1 ones)
GC_PAUSE_MIN_S = 0.02  # a worker's garbage collections counted as pauses from this long
VICTIM_BASE = 50_000  # victims' host numbers: 50,000 + 10 k (so that instance 0 is in svc000)


def source_ip(n: int) -> str:
    return f"127.20.{n // 250}.{n % 250 + 1}"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def host_instances(n: int, count: int, services: int) -> list[Instance]:
    node = f"h{n:05d}"
    out = []
    for i in range(count):
        cid = f"{n:08x}{i:04x}".ljust(64, "0")
        port = 20000 + i
        out.append(Instance(
            service=f"svc{(n * count + i) % services:03d}", id=f"{node}:{cid[:12]}:{port}",
            node=node, address=source_ip(n), port=port, tags=("blue", "v2"),
            meta={"team": "payments", "zone": "eu-west-1a"}, container_id=cid,
            container_name=f"app-{n}-{i}", image="registry.local/app:1.2.3",
            registered_at=time.time()))
    return out


def watched_services(n: int, k: int, services: int) -> list[str]:
    if k <= 0:
        return []  # everything (no filter)
    rnd = random.Random(n)
    return [HOT, *(f"svc{s:03d}" for s in sorted(rnd.sample(range(1, services), k - 1)))]


# ================================================================ worker (one process, N hosts)

_bind = threading.local()


def _install_etcd_host_channels() -> None:
    """Every gRPC channel opened while ``_bind.source`` is set carries that host's own user
    agent. gRPC shares one connection among the channels of a process that have the same
    target and arguments; without this, the hosts of one worker would multiplex over a few
    connections. With it each simulated host has its own connection to a member."""
    from discovery.registry import etcd_aio

    original = etcd_aio.Endpoint

    class HostEndpoint(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, opts: Any = None, **kw: Any) -> None:
            source = getattr(_bind, "source", None)
            if source:
                opts = [*(opts or []), ("grpc.primary_user_agent", f"fleet-host/{source}")]
            super().__init__(*args, opts=opts, **kw)

    etcd_aio.Endpoint = HostEndpoint  # type: ignore[misc]


#: a restart's peak rate counts as measured (for the target) only over samples this close
PEAK_WINDOW_MAX_S = 1.5
#: reconciles running at once in one worker process: more than its hosts that are due within
#: a registry call's timeout (250 hosts, --resync 30 s: ~42 within 5 s), so a reconcile that
#: waits for a registry that is down does not hold back the others (as one thread did: their
#: backlog then ran all at once when the registry came back)
RECONCILE_THREADS = 64


def _relieve_grpc_process_costs() -> None:
    """A per-process cost of grpc-python that a host of its own does not feel, and a few
    hundred hosts in one process do. (Until ``b0256db`` also its 0.1 s wake-up of every thread
    blocked on a stream, ``grpc._common.MAXIMUM_WAIT_TIMEOUT``, raised to 5 s here: the etcd
    streams now run on an asyncio loop, and no host thread blocks on one.)"""
    import grpc._observability

    # grpc-python takes one process-wide lock at the start and the end of every call, to
    # look up its observability plugin (none is installed here, and none can be: nothing calls
    # set_plugin). With a few hundred hosts' threads on one GIL that lock convoys: growing
    # 500 -> 1,000 hosts, 181 of a worker's 837 threads were queued on it and lease grants
    # and puts missed their 5 s deadlines. A host of its own process has a few threads.
    assert grpc._observability._OBSERVABILITY_PLUGIN is None
    grpc._observability._plugin_lock = contextlib.nullcontext()


def _install_zk_source_binding() -> None:
    """Every KazooClient opened while ``_bind.source`` is set connects from that address."""
    from kazoo.handlers import utils as kutils

    import discovery.registry.zk as zkmod
    from discovery.registry.zk_io import PollingHandler

    class BoundHandler(PollingHandler):  # the registry's own handler, bound to an address
        def __init__(self, source: str) -> None:
            super().__init__()
            self.source = source

        def create_connection(self, address: tuple[str, int], hostname: str | None = None,
                              timeout: float | None = None, use_ssl: bool = False,
                              **_kw: Any) -> socket.socket:
            assert not use_ssl, "the fleet bench runs without TLS"
            sock = socket.create_connection(address, timeout,
                                            source_address=(self.source, 0))
            kutils._set_default_tcpsock_options(socket, sock)
            return sock

    original = zkmod.zk_client_options

    def options(url: Any, secrets: Any) -> dict[str, Any]:
        out = original(url, secrets)
        source = getattr(_bind, "source", None)
        if source:
            out["handler"] = BoundHandler(source)
        return out

    zkmod.zk_client_options = options


class Host:
    def __init__(self, n: int, url: str, args: argparse.Namespace,
                 loop: LoopThread | None = None) -> None:
        self.n, self.url, self.args, self.loop = n, url, args, loop
        self.node = f"h{n:05d}"
        self.instances = host_instances(n, args.instances, args.services)
        self.watched = watched_services(n, args.watch_services, args.services)
        self.catalog = Catalog()
        self.registry: Registry | None = None  # the agent's and the watcher's, as in `up`
        self.watch: Any = None
        self.arm: Callable[[Catalog], bool] | None = None
        self.hit: float | None = None
        self.lock = threading.Lock()
        self.reconciles = self.reconcile_errors = self.reregistered = 0
        self.outage = Outage()  # as its registry's state listener tells
        #: the worker's Worker.schedule(n, delay): this host's next reconcile in delay seconds
        self.schedule: Callable[[int, float], None] | None = None

    def start(self) -> None:
        _bind.source = source_ip(self.n)
        try:
            self.registry = open_registry(self.url, ttl=self.args.ttl, loop=self.loop)
        finally:
            _bind.source = None
        self._name_threads()
        self.registry.add_state_listener(self.on_state)
        for inst in self.instances:
            self.registry.register(inst)
        only = self.watched or None
        snap = self.registry.snapshot(only)
        self.catalog.load(snap)
        self.watch = self.registry.watch(self.on_change, snap.revision, only)

    def _name_threads(self) -> None:
        """ZooKeeper: the host's kazoo threads carry its name, so that the worker's log lines
        (``threadName``) tell whose connection dropped, waited or lost its session."""
        client = getattr(self.registry, "client", None)
        routine = getattr(getattr(client, "_connection", None), "_connection_routine", None)
        if isinstance(routine, threading.Thread):
            routine.name = f"{self.node}-zk"
        for i, t in enumerate(getattr(getattr(client, "handler", None), "_workers", ())):
            if isinstance(t, threading.Thread):
                t.name = f"{self.node}-zk-cb{i}"

    def on_change(self, change: Change) -> None:
        self.catalog.apply(change)
        if self.arm is not None and self.hit is None:
            self.check_hit()

    def check_hit(self) -> None:
        with self.lock:
            if self.arm is not None and self.hit is None and self.arm(self.catalog):
                self.hit = time.time()

    def follows(self, service: str) -> bool:
        return not self.watched or service in self.watched

    def reconcile(self) -> None:
        """What the agent's reconcile does with the registry: read this node's entries, write
        what is missing."""
        assert self.registry is not None
        if self.outage.holds_back(self.args.resync):
            return  # as the agent: none while its registry is down (on_state schedules one)
        self.reconciles += 1
        try:
            have = self.registry.node_snapshot(self.node).instances
            for inst in self.instances:
                if inst.key not in have:
                    self.registry.register(inst)
                    self.reregistered += 1
        except Exception:
            self.reconcile_errors += 1

    def on_state(self, up: bool) -> None:
        """The registry's state listener: as the agent, a host whose registry came back
        reconciles at a random moment within one resync period."""
        if self.outage.mark(up) and self.schedule is not None:
            self.schedule(self.n, spread(self.args.resync))

    def close(self, revoke: bool) -> None:
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.close(revoke=revoke)


class Worker:
    """The hosts of one process. Their reconciles run on a pool of threads, each host on its
    own schedule as its own agent would: a reconcile that waits for a registry that is down
    holds only its own host, and the host's next one is due ``--resync`` (±10 %) after it ends,
    or a random moment within one such period after its registry came back (one that falls
    due while the registry is down reads nothing)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hosts: dict[int, Host] = {}
        self.stop = threading.Event()
        self.heap: list[tuple[float, int]] = []
        self.due: dict[int, float] = {}  # host -> when its next reconcile is due (not running)
        self.heap_lock = threading.Lock()
        self.retried = 0
        self.expired = 0  # leases / sessions that expired in this process (ExpiryCounter)
        self.reconcilers = ThreadPoolExecutor(max_workers=RECONCILE_THREADS)
        # every etcd host's streams and lease keeper; when the registry is down, every host's
        # keeper takes a thread of the loop's executor for its round at once
        self.loop = LoopThread("fleet-loop", workers=160)
        threading.Thread(target=self.reconcile_loop, daemon=True, name="reconciles").start()

    def schedule(self, n: int, delay: float) -> None:
        """Host ``n``'s next reconcile in ``delay`` s (instead of when it was due)."""
        when = time.monotonic() + delay
        with self.heap_lock:
            self.due[n] = when
            heapq.heappush(self.heap, (when, n))

    def reconcile_loop(self) -> None:
        while not self.stop.is_set():
            with self.heap_lock:
                due = self.heap[0][0] if self.heap else None
                now = time.monotonic()
                if due is not None and due <= now:
                    _, n = heapq.heappop(self.heap)
                    if self.due.get(n) != due:
                        continue  # moved (the registry came back) or running
                    del self.due[n]
            if due is None or due > now:
                self.stop.wait(min(0.5, due - now) if due is not None else 0.5)
                continue
            host = self.hosts.get(n)
            if host is not None:
                self.reconcilers.submit(self._reconcile, host)

    def _reconcile(self, host: Host) -> None:
        host.reconcile()
        with self.heap_lock:
            if host.n not in self.due:  # not moved meanwhile
                when = time.monotonic() + jittered(self.args.resync)
                self.due[host.n] = when
                heapq.heappush(self.heap, (when, host.n))

    def add(self, numbers: list[int], urls: dict[str, str]) -> dict[str, Any]:
        t0 = time.monotonic()
        failed: list[tuple[int, str]] = []

        def one(n: int) -> None:
            tries = self.args.start_attempts
            for attempt in range(tries):  # a start that times out on a loaded host: once more
                host = Host(n, urls[str(n)], self.args, self.loop)
                try:
                    host.start()
                    break
                except Exception as exc:
                    host.close(revoke=True)
                    if attempt == tries - 1:
                        failed.append((n, f"{type(exc).__name__}: {exc}"[:300]))
                        return
                    self.retried += 1
            self.hosts[n] = host
            host.schedule = self.schedule
            self.schedule(n, random.uniform(0, self.args.resync))  # the first: spread out

        with ThreadPoolExecutor(max_workers=self.args.start_parallel) as pool:
            list(pool.map(one, numbers))
        return {"started": len(numbers) - len(failed), "failed": failed[:5],
                "retried": self.retried,
                "n_failed": len(failed), "took_s": round(time.monotonic() - t0, 2)}

    def stats(self) -> dict[str, Any]:
        per_host = []
        for h in self.hosts.values():
            c = h.registry.reads.counts() if h.registry is not None else ReadCounts()
            per_host.append([h.n, c.bytes, c.keys, c.full_reads, c.node_reads,
                             h.catalog.size()])
        me = rss_kib(os.getpid())
        return {"hosts": len(self.hosts), "reads": per_host,
                "reconciles": sum(h.reconciles for h in self.hosts.values()),
                "reconcile_errors": sum(h.reconcile_errors for h in self.hosts.values()),
                "reregistered": sum(h.reregistered for h in self.hosts.values()),
                "threads": threading.active_count(), "rss_kib": me.get("VmRSS", 0),
                "cpu_ticks": cpu_ticks(os.getpid(), tree=False)}

    def arm(self, kind: str, service: str, keys: list[list[str]]) -> dict[str, Any]:
        wanted = [tuple(k) for k in keys]
        if kind == "put":
            def pred(cat: Catalog) -> bool:
                return all(cat.get(k) is not None for k in wanted)  # type: ignore[arg-type]
        else:
            def pred(cat: Catalog) -> bool:
                return all(cat.get(k) is None for k in wanted)  # type: ignore[arg-type]
        armed = 0
        for h in self.hosts.values():
            with h.lock:
                h.hit = None
                h.arm = pred if h.follows(service) else None
            armed += h.arm is not None
        return {"armed": armed}

    def collect(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        armed = [h for h in self.hosts.values() if h.arm is not None]
        # Hits are taken by the watch callbacks (on_change); this loop only looks at them, so
        # that it takes as little CPU as it can from the deliveries it measures. A host's
        # catalog is checked here only at the start (a change applied before arming) and once
        # more before the host counts as missing.
        for last_look in (False, True):
            for h in armed:
                if h.hit is None:
                    h.check_hit()
            while not last_look and time.monotonic() < deadline:
                if all(h.hit is not None for h in armed):
                    break
                time.sleep(0.02)
        hits = {str(h.n): h.hit for h in armed if h.hit is not None}
        missing = [h.n for h in armed if h.hit is None]
        for h in armed:
            with h.lock:
                h.arm = None
        return {"hits": hits, "missing": missing}

    def check(self, truth: dict[str, list[str]]) -> dict[str, Any]:
        bad: list[int] = []
        for h in self.hosts.values():
            for svc in (h.watched or truth.keys()):
                have = {i.id for i in h.catalog.instances(svc)}
                if have != set(truth.get(svc, [])):
                    bad.append(h.n)
                    break
        return {"hosts": len(self.hosts), "mismatched": len(bad), "examples": bad[:5]}

    def quit(self, revoke: bool) -> dict[str, Any]:
        self.stop.set()
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda h: h.close(revoke), self.hosts.values()))
        return {"closed": len(self.hosts)}


class GcPauses:
    """The worker's own garbage collections of over ``GC_PAUSE_MIN_S``: each holds the thread
    that made it for all of its run, and the GIL while it computes. Timed twice: wall clock,
    which includes waiting for a CPU and for the GIL (finalizers run inside a collection let
    other threads in), and the collecting thread's own CPU time."""

    def __init__(self) -> None:
        self._t0 = (0.0, 0.0)
        self.pauses: list[tuple[float, int, float, float]] = []  # (end, gen, wall s, CPU s)
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = (time.perf_counter(), time.thread_time())
            return
        took = time.perf_counter() - self._t0[0]
        if took >= GC_PAUSE_MIN_S:
            cpu = time.thread_time() - self._t0[1]
            self.pauses.append((time.time(), info["generation"], took, cpu))

    def since(self, t: float) -> list[tuple[float, int, float, float]]:
        return [p for p in self.pauses if p[0] >= t]


class ExpiryCounter(logging.Handler):
    """Counts the backends' "lease/session expired; re-registering" warnings in a worker: a
    host whose renewals or pings missed its TTL inside this process."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(logging.WARNING)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        if "expired; re-registering" in str(record.msg):
            self.worker.expired += 1


def worker_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    raise_nofile()
    threading.stack_size(512 * 1024)
    _install_zk_source_binding()
    _install_etcd_host_channels()
    _relieve_grpc_process_costs()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we go
    if args.full_gc == "between-phases":  # Fleet.freeze: no full collection on its own
        gc.set_threshold(*gc.get_threshold()[:2], FULL_GC_NEVER)
    w = Worker(args)
    pauses = GcPauses()
    sent = RequestLog()
    count_zk_requests(sent)
    logging.getLogger("discovery.registry").addHandler(ExpiryCounter(w))
    out = sys.stdout
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            if cmd == "add":
                reply = w.add(msg["hosts"], msg["urls"])
            elif cmd == "stats":
                reply = w.stats()
            elif cmd == "cpu":
                reply = {"cpu_ticks": cpu_ticks(os.getpid(), tree=False),
                         "expired": w.expired}
            elif cmd == "gc":
                reply = {"pauses": pauses.since(msg["since"])}
            elif cmd == "requests":  # what the ZooKeeper hosts sent, by type (zk_requests)
                reply = {"rows": sent.since(msg["since"])}
            elif cmd == "freeze":  # between phases: see Fleet.freeze
                gc.unfreeze()  # the whole heap, timed: what a host's share of it costs
                t0 = time.thread_time()
                gc.collect()
                took = time.thread_time() - t0
                gc.freeze()
                reply = {"collect_cpu_s": round(took, 4), "frozen": gc.get_freeze_count(),
                         "hosts": len(w.hosts)}
            elif cmd == "arm":
                reply = w.arm(msg["kind"], msg["service"], msg["keys"])
            elif cmd == "collect":
                reply = w.collect(msg["timeout"])
            elif cmd == "check":
                reply = w.check(msg["truth"])
            elif cmd == "quit":
                reply = w.quit(msg.get("revoke", True))
                out.write(json.dumps(reply) + "\n")
                out.flush()
                return 0
            else:
                reply = {"error": f"unknown command {cmd}"}
        except Exception:
            reply = {"error": traceback.format_exc()[-2000:]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


# ================================================================ the parent side


class WorkerProc:
    """One worker process, spoken to over its stdin/stdout, stopped by its own pid."""

    def __init__(self, args: argparse.Namespace, log: Path, backend: str) -> None:
        # The simulated hosts stand for other machines: niced, so that they do not starve the
        # registry members of CPU on this one (at 1,000 hosts an un-niced fleet took the etcd
        # members' heartbeats down: "no leader"). Their own timings only get worse for it.
        script = Path(__file__).resolve()
        if backend == "zk" and args.zk_hosts == "greenlets":
            script = script.with_name("fleet_greenlets.py")
        argv = ["nice", "-n", str(args.worker_nice), sys.executable, str(script), "--worker",
                "--ttl", str(args.ttl), "--resync", str(args.resync),
                "--instances", str(args.instances), "--services", str(args.services),
                "--watch-services", str(args.watch_services),
                "--start-parallel", str(args.start_parallel),
                "--start-attempts", str(args.start_attempts), "--full-gc", args.full_gc]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # A new session is a new autogroup when the kernel groups by session
        # (/proc/sys/kernel/sched_autogroup_enabled): there ``nice`` only ranks threads within
        # the group, and the group's own weight is its autogroup nice.
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(args.worker_nice))
        self.lock = threading.Lock()
        self.count = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.pid} exited ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.pid}: {reply['error']}")
        return reply

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.send(cmd, **kw)
            return self.recv()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def quit(self, revoke: bool = True, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit", revoke=revoke)
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.kill()
        else:
            self.log.close()


def all_workers(workers: Sequence[WorkerProc], cmd: str, **kw: Any) -> list[dict[str, Any]]:
    for w in workers:
        with w.lock:
            w.send(cmd, **kw)
    return [w.recv() for w in workers]


# ---------------------------------------------------------------- relays (etcd only)


def free_port_block(count: int, start: int = 12000, stop: int = 32000) -> int:
    """The first port p in [start, stop) with p .. p + count - 1 all bindable on 127.0.0.1
    (below the ephemeral range, so no free_port() of another test picks one meanwhile)."""
    base = start
    while base + count <= stop:
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    base, ok = p + 1, False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {count} free ports below {stop}")


class Relay:
    """One HAProxy in TCP mode: for host n and member m, 127.0.0.1:<port> → member m's
    client port, from ``source_ip(n)``. Stopped by its own pid."""

    def __init__(self, hosts: Sequence[int], targets: Sequence[int], work: Path) -> None:
        self.targets = list(targets)
        self.base = free_port_block(len(hosts) * len(targets))
        self.ports: dict[int, list[int]] = {}
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxconn = max(1000, (hard - len(hosts) * len(targets) - 200) // 2)
        # A relay must not queue: while the members are down every host's channels retry
        # (about 6 connection attempts a second per host), and a relay that holds them (its
        # default 1 s turn-around before a retry, half-closed sessions, deep accept queues)
        # fills up and is still chewing dead attempts long after the members are back.
        lines = ["global", f"  maxconn {maxconn}", "  log stderr format short local0 err", "",
                 "defaults", "  mode tcp", "  maxconn 32", "  backlog 32",
                 "  timeout connect 500ms", "  timeout client 1h", "  timeout server 1h",
                 "  timeout client-fin 1s", "  timeout server-fin 1s", "  retries 0", ""]
        p = self.base
        for n in hosts:
            self.ports[n] = []
            for m, target in enumerate(self.targets):
                lines += [f"listen h{n}m{m}", f"  bind 127.0.0.1:{p}",
                          f"  server m{m} 127.0.0.1:{target} source {source_ip(n)}", ""]
                self.ports[n].append(p)
                p += 1
        self.cfg = work / "relay.cfg"
        self.cfg.write_text("\n".join(lines))
        self.log = (work / "relay.log").open("ab")
        self.proc = subprocess.Popen([HAPROXY_BIN, "-db", "-f", str(self.cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        last = self.ports[hosts[-1]][-1]
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay HAProxy exited {self.proc.returncode}: "
                                   f"{(work / 'relay.log').read_text()[-1500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", last), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("relay HAProxy not listening within 30 s")
            time.sleep(0.1)

    def url(self, n: int) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[n]) + PREFIX

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


# ---------------------------------------------------------------- server-side counters

_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
ETCD_GAUGES = ("etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes",
               "etcd_debugging_mvcc_keys_total", "etcd_debugging_mvcc_watcher_total",
               "etcd_debugging_mvcc_watch_stream_total",
               "etcd_network_client_grpc_sent_bytes_total",
               "etcd_network_client_grpc_received_bytes_total",
               "etcd_server_proposals_committed_total")
#: what counts as a request: (metric, grpc_type)
ETCD_REQUESTS = {("grpc_server_handled_total", "unary"),
                 ("grpc_server_msg_received_total", "bidi_stream")}
ZK_KEYS = ("zk_packets_received", "zk_packets_sent", "zk_num_alive_connections",
           "zk_watch_count", "zk_znode_count", "zk_ephemerals_count",
           "zk_approximate_data_size", "zk_outstanding_requests", "zk_avg_latency",
           "zk_max_latency")


def etcd_counters(port: int, timeout: float = 2.0) -> dict[str, float]:
    """Requests (unary handled + stream messages received, by method) and a few gauges."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {"requests": 0.0}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
        method = labels.get("grpc_method", "")
        if (name, labels.get("grpc_type")) in ETCD_REQUESTS:
            out["requests"] += value
            out[f"req.{method}"] = out.get(f"req.{method}", 0.0) + value
        elif name in ETCD_GAUGES:
            out[name] = out.get(name, 0.0) + value
    return out


def zk_counters(port: int, timeout: float = 2.0) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"mntr")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    out: dict[str, float] = {}
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        key, _, value = line.partition("\t")
        if key in ZK_KEYS:
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    out["requests"] = out.get("zk_packets_received", 0.0)
    return out


class Servers:
    """The cluster plus how to read each member's counters, pid, RSS and CPU."""

    def __init__(self, backend: str, work: Path, zk_jvm: str = "test",
                 zk_io: str = "direct", etcd_procs: int = 1) -> None:
        from tests.harness.servers import (
            ZK_DIRECT_IO,
            ZK_SERVER_JVM,
            ZK_TEST_JVM,
            EtcdCluster,
            ZkEnsemble,
        )

        self.backend = backend
        jvm = ZK_SERVER_JVM if zk_jvm == "server" else ZK_TEST_JVM
        settings = ZK_DIRECT_IO if zk_io == "direct" else ()
        self.cluster = (EtcdCluster(3, work / "etcd", etcd_procs) if backend == "etcd"
                        else ZkEnsemble(3, work / "zk", jvm, settings))
        self._readers = ThreadPoolExecutor(max_workers=3)  # one per member

    def counters(self) -> list[dict[str, float] | None]:
        """Every member's counters, read at once (one thread each): a member slow to answer
        (a ZooKeeper's ``mntr`` in a reconnect burst takes a second) delays no other's."""
        read = etcd_counters if self.backend == "etcd" else zk_counters

        def one(port: int) -> dict[str, float] | None:
            try:
                return read(port)
            except (OSError, ValueError):
                return None

        return list(self._readers.map(one, self.cluster.client_ports))

    def pids(self) -> list[int | None]:
        return [p.popen.pid if p.running and p.popen else None for p in self.cluster.procs]

    def usage(self) -> dict[str, Any]:
        pids = self.pids()
        return {"rss_mib": [round(rss_kib(p).get("VmRSS", 0) / 1024, 1) if p else None
                            for p in pids],
                "ticks": [cpu_ticks(p, tree=False) if p else None for p in pids]}


def total(counts: Sequence[dict[str, float] | None], key: str = "requests") -> float:
    return sum((c or {}).get(key, 0.0) for c in counts)


class RateSampler:
    """Server request totals every ``interval`` s in a thread (restarts reset a member's
    counters: a drop counts as a restart from 0), each sample stamped when its reads ended, the
    next one due ``interval`` after the last began. A read that takes longer stretches the
    interval: :meth:`peak_per_s` tells the window it could resolve (``peak_window_s``)."""

    def __init__(self, servers: Servers, interval: float = 0.25,
                 workers: Sequence[int] = ()) -> None:
        self.servers, self.interval, self.workers = servers, interval, list(workers)
        # (time, the members' CPU seconds, the workers' CPU seconds) since the sample before:
        # what each side got of the machine through a restart
        self.cpu: list[tuple[float, float, float]] = []
        self._ticks: dict[int, int] = {}
        self.samples: list[tuple[float, float]] = []  # (time, cumulative requests)
        self._last: list[dict[str, float] | None] = [None] * 3
        self._acc: dict[str, float] = {}
        self.by_method: list[dict[str, float]] = []
        self.peak_from: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            counts = self.servers.counters()
            t = time.time()
            for i, c in enumerate(counts):
                if c is None:
                    continue
                last = self._last[i]
                for key, v in c.items():
                    if key != "requests" and not key.startswith("req."):
                        continue
                    before = None if last is None else last.get(key)
                    self._acc[key] = self._acc.get(key, 0.0) + (
                        v if before is None or v < before else v - before)
                self._last[i] = c
            self.samples.append((t, self._acc.get("requests", 0.0)))
            self.by_method.append(dict(self._acc))
            members = [p for p in self.servers.pids() if p]
            self.cpu.append((t, self._cpu_s(members), self._cpu_s(self.workers)))
            self._stop.wait(max(began + self.interval - time.time(), 0.0))

    def _cpu_s(self, pids: Sequence[int]) -> float:
        """CPU seconds ``pids`` used since the previous sample (a pid seen for the first time,
        such as a restarted member's: since it started)."""
        got = 0
        for pid in pids:
            ticks = cpu_ticks(pid, tree=False)
            got += max(ticks - self._ticks.get(pid, 0), 0)
            self._ticks[pid] = ticks
        return got / CLK_TCK

    def cpu_by_second(self, t0: float, seconds: int) -> list[list[float]]:
        """[second after ``t0``, the members' cores, the workers' cores] over whole seconds."""
        bins: dict[int, list[float]] = {}
        for t, m, w in self.cpu[1:]:  # the first: since each process started
            if 0 <= t - t0 < seconds:
                b = bins.setdefault(int(t - t0), [0.0, 0.0])
                b[0] += m
                b[1] += w
        return [[k, round(m, 2), round(w, 2)] for k, (m, w) in sorted(bins.items())]

    def methods_between(self, t0: float, t1: float) -> dict[str, float]:
        """Requests per method between the samples nearest ``t0`` and ``t1``."""
        i = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - t0))
        j = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - t1))
        a, b = self.by_method[i], self.by_method[j]
        return {k[4:]: round(b[k] - a.get(k, 0.0)) for k in b
                if k.startswith("req.") and b[k] - a.get(k, 0.0) > 0}

    def peak_per_s(self, since: float, window: float = 1.0) -> tuple[float, float | None]:
        """(highest rate over any ``window`` s or more ending after ``since``, when): for each
        sample, the rate since the latest sample at least ``window`` s before it."""
        s = self.samples
        best, when = 0.0, None
        k = 0
        for i in range(len(s)):
            if s[i][0] < since:
                continue
            while k + 1 < i and s[i][0] - s[k + 1][0] >= window:
                k += 1
            dt = s[i][0] - s[k][0]
            if dt >= window:
                rate = (s[i][1] - s[k][1]) / dt
                if rate > best:
                    best, when, self.peak_from = rate, s[i][0], s[k][0]
        return best, when


# ---------------------------------------------------------------- client-side bytes (kernel)


def socket_bytes(server_ports: Iterable[int], by_pid: bool = False) -> dict[str, list[int]]:
    """[connections, bytes sent, bytes received] over every established TCP connection to one
    of ``server_ports`` (tcp_info), per fleet source address (``127.20.0.0/16``), or with
    ``by_pid`` per process (``pid:<n>``: hosts that share 127.0.0.1)."""
    ports = {str(p) for p in server_ports}
    argv = ["ss", "-tinH", "state", "established"]
    argv += ["-p"] if by_pid else ["src", "127.20.0.0/16"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    res: dict[str, list[int]] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            parts = line.split()
            if by_pid:
                pid = re.search(r"pid=(\d+)", line)
                local, peer = parts[2], parts[3]
                key = f"pid:{pid.group(1)}" if pid else None
            else:
                local, peer = parts[-2], parts[-1]
                key = local.rsplit(":", 1)[0]
            current = key if peer.rsplit(":", 1)[-1] in ports else None
            continue
        if current is None:
            continue
        sent = re.search(r"bytes_sent:(\d+)", line)
        recv = re.search(r"bytes_received:(\d+)", line)
        row = res.setdefault(current, [0, 0, 0])
        row[0] += 1
        row[1] += int(sent.group(1)) if sent else 0
        row[2] += int(recv.group(1)) if recv else 0
        current = None
    return res


def bytes_delta(before: dict[str, list[int]], after: dict[str, list[int]]
                ) -> dict[str, tuple[int, int]]:
    return {ip: (a[1] - before.get(ip, [0, 0, 0])[1], a[2] - before.get(ip, [0, 0, 0])[2])
            for ip, a in after.items()}


# ---------------------------------------------------------------- the run


def _r(v: float | None, d: int = 2) -> float | None:
    return None if v is None else round(v, d)


def dist(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": _r(percentile(values, 0.5)), "p99": _r(percentile(values, 0.99)),
            "max": _r(max(values)) if values else None, "min": _r(min(values)) if values else None}


class Fleet:
    def __init__(self, args: argparse.Namespace, backend: str, work: Path,
                 report: Report) -> None:
        self.args, self.backend, self.work, self.report = args, backend, work, report
        self.servers = Servers(backend, work, args.zk_jvm, args.zk_io, args.etcd_procs)
        self.relay: Relay | None = None
        self.proxy: Any = None
        self.workers: list[WorkerProc] = []
        self.hosts: list[int] = []
        self.samples: dict[str, Any] = {}
        self.gc_model: dict[str, float] = {}  # Fleet.freeze: a host's share of a worker's heap
        self.writer: Registry | None = None
        self.probe_seq = 0
        self.worker_hosts: dict[int, int] = {}  # worker pid -> hosts it holds

    @property
    def by_pid(self) -> bool:
        """etcd without the relay: every host connects from 127.0.0.1, so bytes are counted
        per worker process and divided by its hosts (a per-host mean per process)."""
        return self.backend == "etcd" and self.relay is None

    def sockets(self) -> dict[str, list[int]]:
        return socket_bytes(self.server_ports(), self.by_pid)

    def per_host(self, delta: dict[str, tuple[int, int]]) -> list[tuple[float, float]]:
        """(bytes sent, bytes received) of every host in ``delta``'s window."""
        if not self.by_pid:
            return [delta.get(source_ip(h), (0, 0)) for h in self.hosts]
        out: list[tuple[float, float]] = []
        for pid, n in self.worker_hosts.items():
            sent, recv = delta.get(f"pid:{pid}", (0, 0))
            out += [(sent / n, recv / n)] * n
        return out

    def connections(self, snap: dict[str, list[int]]) -> int:
        if self.by_pid:
            return sum(snap.get(f"pid:{pid}", [0])[0] for pid in self.worker_hosts)
        ips = {source_ip(h) for h in self.hosts}
        return sum(v[0] for ip, v in snap.items() if ip in ips)

    # -- set-up / tear-down

    def start(self) -> None:
        say(f"{self.backend}: starting a 3-member cluster")
        self.servers.cluster.start()
        if self.backend == "etcd" and self.args.grpc_proxy:
            from tests.harness.fleet import EtcdGrpcProxy

            self.proxy = EtcdGrpcProxy(self.servers.cluster, self.work / "proxy").start()
        if self.backend == "etcd" and self.args.etcd_relay:
            every = list(range(max(self.args.sizes))) + [
                VICTIM_BASE + 10 * k for k in range(len(self.args.sizes))]
            targets = ([self.proxy.port] if self.proxy is not None
                       else self.servers.cluster.client_ports)
            say(f"etcd: relay HAProxy with {len(every) * len(targets)} ports (one source "
                "address per host)")
            self.relay = Relay(every, targets, self.work)
        # The bench's own client measures when the registry serves again: it reconnects
        # without the fleet's resume spread (spread=0), or "serving again" would come late
        self.writer = open_registry(self.direct_url() + "?spread=0", ttl=self.args.ttl,
                                    timeout=15.0)
        self.workers = [WorkerProc(self.args, self.work / f"worker{i}.log", self.backend)
                        for i in range(self.args.workers)]

    def direct_url(self) -> str:
        return self.servers.cluster.url(PREFIX)

    def url_of(self, n: int) -> str:
        if self.relay is not None:
            return self.relay.url(n)
        if self.proxy is not None:
            return self.proxy.url(PREFIX)
        return self.direct_url()

    def close(self) -> None:
        for w in self.workers:
            w.quit(revoke=True)
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.relay is not None:
            self.relay.stop()
        if self.proxy is not None:
            self.proxy.stop()
        self.servers.cluster.stop()

    def server_ports(self) -> list[int]:
        """Where the hosts connect: the members, or the grpc-proxy."""
        if self.proxy is not None:
            return [self.proxy.port]
        return list(self.servers.cluster.client_ports)

    # -- phases

    def grow(self, size: int) -> None:
        new = list(range(len(self.hosts), size))
        if not new:
            return
        say(f"{self.backend}: adding {len(new)} hosts ({len(self.hosts)} → {size})")
        t0 = time.monotonic()
        load0 = self.servers.usage()
        replies: list[dict[str, Any]] = []
        quiet_waits: list[float] = []
        expired0 = self.workers_sample()[1]
        step = max(self.args.grow_step, len(self.workers))
        for s in range(0, len(new), step):  # in steps, as a fleet is rolled out
            batch = new[s:s + step]
            # host n goes to worker n mod workers, evenly over the whole growth (each batch
            # dealt from the first worker gave 4 of 8 workers 150 hosts and 4 of them 100)
            chunks = [[n for n in batch if n % len(self.workers) == i]
                      for i in range(len(self.workers))]
            for w, chunk in zip(self.workers, chunks, strict=True):
                with w.lock:
                    w.send("add", hosts=chunk, urls={str(n): self.url_of(n) for n in chunk})
            for w, chunk in zip(self.workers, chunks, strict=True):
                replies.append(w.recv())
                self.worker_hosts[w.pid] = self.worker_hosts.get(w.pid, 0) + len(chunk)
            failed = sum(r["n_failed"] for r in replies)
            if failed:
                raise RuntimeError(f"{failed} hosts did not start: "
                                   f"{[r['failed'] for r in replies if r['failed']]}")
            self.hosts += batch
            waited, expired = self.wait_quiet()
            quiet_waits.append(waited)
            if s + step < len(new):  # after the last step: steady() does it
                self.freeze(quiet=True)
            expired -= expired0
            if expired:
                raise RuntimeError(
                    f"the simulator starved its own hosts at {len(self.hosts)} hosts: {expired} "
                    "leases/sessions expired while the fleet grew (their renewals or pings "
                    "missed the TTL inside the worker processes); what it would measure at "
                    f"{size} hosts is the simulator, not the registry")
        took = time.monotonic() - t0
        load1 = self.servers.usage()
        self.report.emit({"name": "fleet_grow", "backend": self.backend, "size": size,
                          "added": len(new), "took_s": round(took, 1),
                          "start_retries": sum(r.get("retried", 0)  # cumulative per worker
                                               for r in replies[-len(self.workers):]),
                          "server_cpu_pct": self._cpu_pct(load0, load1, took),
                          "quiet_waits_s": [round(x, 1) for x in quiet_waits]})

    def wait_quiet(self, limit: float = 120.0) -> tuple[float, int]:
        """After a step of the growth: until the workers have caught up with it (their CPU
        over one second below ``--grow-quiet`` cores plus 1 ms a second per host, about twice
        what the hosts use when nothing happens) or ``limit`` s. Every new instance
        reaches each host following its service, so a step of 100 hosts is ~50,000 watch
        deliveries at 1,000 hosts: a simulator that takes the next step before it has
        delivered them starves its own hosts' lease renewals, not the registry. Returns the
        seconds waited and the workers' expired leases/sessions so far."""
        t0 = time.monotonic()
        last, expired = self.workers_sample()
        while time.monotonic() - t0 < limit:
            time.sleep(1.0)
            now, expired = self.workers_sample()
            busy, last = now - last, now
            if busy < self.args.grow_quiet + 0.001 * len(self.hosts):
                break
        return time.monotonic() - t0, expired

    @staticmethod
    def _cpu_s(a: dict[str, Any], b: dict[str, Any]) -> list[float | None]:
        """Each member's CPU seconds between two ``Servers.usage()`` readings (None: a member
        down at either, or restarted between them)."""
        return [None if x is None or y is None or y < x else (y - x) / CLK_TCK
                for x, y in zip(a["ticks"], b["ticks"], strict=True)]

    def _cpu_pct(self, a: dict[str, Any], b: dict[str, Any], wall: float) -> list[float | None]:
        return [None if c is None else round(100 * c / wall, 1) for c in self._cpu_s(a, b)]

    def steady(self, size: int) -> dict[str, Any]:
        say(f"{self.backend} {size}: settling {self.args.settle:g}s, then steady state for "
            f"{self.args.steady:g}s")
        self.freeze()
        time.sleep(self.args.settle)
        c0, b0, u0 = self.servers.counters(), self.sockets(), self.servers.usage()
        relay0 = cpu_ticks(self.relay.pid, tree=False) if self.relay else 0
        proxy0 = cpu_ticks(self.proxy.pid, tree=False) if self.proxy and self.proxy.pid else 0
        s0 = all_workers(self.workers, "stats")
        t0, t0_wall = time.monotonic(), time.time()
        time.sleep(self.args.steady)
        wall = time.monotonic() - t0
        kinds = self.client_requests(t0_wall)
        c1, b1, u1 = self.servers.counters(), self.sockets(), self.servers.usage()
        s1 = all_workers(self.workers, "stats")
        relay_cpu = (round(100 * (cpu_ticks(self.relay.pid, tree=False) - relay0) / CLK_TCK
                           / wall, 1) if self.relay else None)
        proxy_cpu = (round(100 * (cpu_ticks(self.proxy.pid, tree=False) - proxy0) / CLK_TCK
                           / wall, 1) if self.proxy and self.proxy.pid else None)
        n = len(self.hosts)
        req = total(c1) - total(c0)
        methods = sorted({k for c in c1 if c for k in c if k.startswith("req.")})
        by_method = {m[4:]: round((total(c1, m) - total(c0, m)) / wall / n, 4) for m in methods
                     if total(c1, m) - total(c0, m) > 0}
        hosts_bytes = self.per_host(bytes_delta(b0, b1))
        sent = [b[0] / wall for b in hosts_bytes]
        recv = [b[1] / wall for b in hosts_bytes]
        r0 = {row[0]: row for s in s0 for row in s["reads"]}
        read_b = [(row[1] - r0.get(row[0], [0, 0])[1]) / wall for s in s1 for row in s["reads"]]
        read_k = [(row[2] - r0.get(row[0], [0, 0, 0])[2]) / wall for s in s1 for row in s["reads"]]
        conns = self.connections(b1)
        gauges = {k: total(c1, k) for k in (*ETCD_GAUGES, *ZK_KEYS)
                  if any(c and k in c for c in c1)}
        row = {"name": "fleet_steady", "backend": self.backend, "size": size,
               "window_s": round(wall, 1),
               "requests_per_s_per_host": round(req / wall / n, 4),
               "requests_per_s_total": round(req / wall, 1),
               "requests_by_method_per_s_per_host": by_method,
               # ZooKeeper: what the hosts sent (zk_requests), by type
               "client_requests_by_type_per_s_per_host": {
                   k: round(v / wall / n, 4)
                   for k, v in by_type_between(kinds, t0_wall, t0_wall + wall).items()}
               if kinds else None,
               "client_sent_bytes_per_s_per_host": dist(sent),
               "client_received_bytes_per_s_per_host": dist(recv),
               "client_bytes_per_s_per_host_mean": round((sum(sent) + sum(recv)) / n, 1),
               "reads_bytes_per_s_per_host": dist(read_b),
               "reads_keys_per_s_per_host": dist(read_k),
               "reads_bytes_per_s_per_host_mean": round(sum(read_b) / n, 1),
               "connections": conns,
               "reconciles": sum(s["reconciles"] for s in s1) - sum(s["reconciles"] for s in s0),
               "reconcile_errors": sum(s["reconcile_errors"] for s in s1),
               "reregistered": sum(s["reregistered"] for s in s1),
               "server_rss_mib": u1["rss_mib"],
               "server_cpu_pct": self._cpu_pct(u0, u1, wall),
               "relay_cpu_pct": relay_cpu, "proxy_cpu_pct": proxy_cpu,
               "relay_rss_mib": round(rss_kib(self.relay.pid).get("VmRSS", 0) / 1024, 1)
               if self.relay else None,
               "worker_rss_mib": [round(s["rss_kib"] / 1024) for s in s1],
               "worker_threads": [s["threads"] for s in s1],
               "worker_cpu_ms_per_host_s": round(
                   1000 * (sum(s["cpu_ticks"] for s in s1) - sum(s["cpu_ticks"] for s in s0))
                   / CLK_TCK / wall / n, 3),
               # --full-gc between-phases: what a host's share of its worker's heap is
               "worker_heap": dict(self.gc_model),
               "server": gauges, "host_loadavg": list(os.getloadavg())}
        return self.report.emit(row)

    def client_requests(self, since: float) -> list[list[Any]]:
        """ZooKeeper: every request the hosts sent since ``since``, ``[bucket, type, n]``
        (:mod:`zk_requests`); etcd: none (the members count theirs by method)."""
        if self.backend != "zk":
            return []
        return merge(r["rows"] for r in all_workers(self.workers, "requests", since=since))

    def _arm(self, kind: str, service: str, keys: list[tuple[str, str]]) -> int:
        return sum(r["armed"] for r in all_workers(self.workers, "arm", kind=kind,
                                                    service=service, keys=keys))

    def _collect(self, timeout: float, t0: float) -> tuple[list[float], list[int]]:
        replies = all_workers(self.workers, "collect", timeout=timeout)
        lat = [(t - t0) * 1000 for r in replies for t in r["hits"].values()]
        missing = [n for r in replies for n in r["missing"]]
        return lat, missing

    def probe(self, seq: int) -> Instance:
        cid = f"{seq:08x}".ljust(64, "f")
        return Instance(service=HOT, id=f"probe:{cid[:12]}:{9000 + seq % 1000}", node="probe",
                        address="127.0.0.1", port=9000 + seq % 1000, container_id=cid,
                        registered_at=time.time())

    def gc_pauses(self, since: float) -> dict[str, Any]:
        """The workers' garbage collections of over ``GC_PAUSE_MIN_S`` (wall clock) since
        ``since``: how many, how many of them full (generation 2), their wall time and their
        CPU time (in all, the longest)."""
        pauses = [p for r in all_workers(self.workers, "gc", since=since) for p in r["pauses"]]
        return {"n": len(pauses), "full": sum(1 for p in pauses if p[1] == 2),
                "wall_s": round(sum(p[2] for p in pauses), 2),
                "wall_max_s": round(max((p[2] for p in pauses), default=0.0), 3),
                "cpu_s": round(sum(p[3] for p in pauses), 2),
                "cpu_max_s": round(max((p[3] for p in pauses), default=0.0), 3)}

    def freeze(self, quiet: bool = False) -> None:
        """``--full-gc between-phases`` (the default; why: the module docstring): each worker
        makes one full collection of its whole heap and freezes it (``gc.freeze``); between
        these calls it makes young collections only. Records a host's share in ``gc_model``."""
        if self.args.full_gc != "between-phases":
            return
        replies = all_workers(self.workers, "freeze")
        hosts = sum(r["hosts"] for r in replies)
        if hosts:
            objects = sum(r["frozen"] for r in replies) / hosts
            per_host = max(r["collect_cpu_s"] / max(r["hosts"], 1) for r in replies) * 1000
            self.gc_model = {"objects_per_host": round(objects),
                             "full_collection_cpu_ms_per_host": round(per_host, 2)}
            if not quiet:
                say(f"workers collected and froze their heaps: {objects:,.0f} objects a host, "
                    f"a full collection {per_host:.2f} ms of CPU a host")

    def workers_sample(self) -> tuple[float, int]:
        """The workers' CPU seconds so far, and their hosts' expired leases/sessions."""
        replies = all_workers(self.workers, "cpu")
        return (sum(r["cpu_ticks"] for r in replies) / CLK_TCK,
                sum(r["expired"] for r in replies))

    def changes(self, size: int, idle_ms_per_host_s: float) -> dict[str, Any]:
        """``idle_ms_per_host_s``: the workers' CPU per host in the steady state, taken off
        their CPU during the changes to give what one delivery cost them."""
        assert self.writer is not None
        lat_all: list[float] = []
        per_change = []
        missing_total = 0
        b0 = self.sockets()
        cpu0, members0 = self.workers_sample()[0], self.servers.usage()
        requests0 = total(self.servers.counters())
        t_changes, wall0 = time.monotonic(), time.time()
        for i in range(self.args.changes):
            if i % 2 == 0:
                self.probe_seq += 1
                inst = self.probe(self.probe_seq)
                armed = self._arm("put", HOT, [inst.key])
                t0 = time.time()
                self.writer.register(inst)
            else:
                armed = self._arm("gone", HOT, [inst.key])
                t0 = time.time()
                self.writer.deregister(inst.service, inst.id)
            lat, missing = self._collect(self.args.change_timeout, t0)
            lat_all += lat
            missing_total += len(missing)
            per_change.append({"kind": "put" if i % 2 == 0 else "delete", "armed": armed,
                               "reached": len(lat), **dist(lat)})
            time.sleep(self.args.change_gap)
        changes_s = time.monotonic() - t_changes
        cpu_s = self.workers_sample()[0] - cpu0
        members_s = sum(c or 0.0 for c in self._cpu_s(members0, self.servers.usage()))
        requests = total(self.servers.counters()) - requests0
        b1 = self.sockets()
        deliveries = max(len(lat_all), 1)
        idle_s = idle_ms_per_host_s / 1000 * len(self.hosts) * changes_s
        recv = sum(b[1] for b in self.per_host(bytes_delta(b0, b1)))
        self.samples.setdefault("change_latency_ms", {})[str(size)] = [round(x, 2)
                                                                       for x in lat_all]
        p99 = percentile(lat_all, 0.99)
        expected = len(self.hosts) * self.args.changes
        ok = len(lat_all) == expected and p99 <= self.args.target_change_ms
        return self.report.emit({
            "name": "fleet_change", "backend": self.backend, "size": size,
            "n": len(lat_all), "expected": expected, "hosts_missed": missing_total,
            "p50_ms": _r(percentile(lat_all, 0.5)), "p99_ms": _r(p99),
            "max_ms": _r(max(lat_all)) if lat_all else None,
            "per_change": per_change,
            "received_bytes_per_change_all_hosts": round(recv / self.args.changes),
            "received_bytes_per_change_per_host": round(recv / self.args.changes
                                                        / len(self.hosts), 1),
            "changes_window_s": round(changes_s, 1),
            # the simulated hosts' own CPU: one delivery (a watch event into a host's catalog)
            # costs a worker this much; the hosts of a worker take their turn on its one GIL,
            # and all workers share the machine's cores with the registry members
            "worker_cpu_s": round(cpu_s, 2),
            "worker_cpu_us_per_delivery": round(max(cpu_s - idle_s, 0) / deliveries * 1e6),
            # the registry members' CPU and the requests they counted in the same window
            # (steady traffic included)
            "members_cpu_s": round(members_s, 2),
            "members_requests": round(requests),
            # a worker's collections, each holding the thread that made it (docs/benchmarks.md)
            "worker_gc_pauses": self.gc_pauses(wall0),
            "note_bytes": "includes the steady traffic of the window",
            "target": f"every host, p99 <= {self.args.target_change_ms:g} ms", "pass": ok})

    def death(self, size: int, k: int) -> dict[str, Any]:
        victim = VICTIM_BASE + 10 * k
        say(f"{self.backend} {size}: a host dies (SIGKILL of its process)")
        w = WorkerProc(self.args, self.work / f"victim{k}.log", self.backend)
        try:
            r = w.call("add", hosts=[victim], urls={str(victim): self.url_of(victim)})
            if r["n_failed"]:
                raise RuntimeError(f"victim did not start: {r['failed']}")
            insts = host_instances(victim, self.args.instances, self.args.services)
            hot = [i.key for i in insts if i.service == HOT]
            self._arm("put", HOT, hot)
            _, missing = self._collect(30, time.time())
            if missing:
                say(f"{len(missing)} hosts never saw the victim's {HOT} instance")
            keys = [i.key for i in insts]
            armed = sum(r["armed"] for r in all_workers(
                self.workers, "arm", kind="gone", service=HOT, keys=keys))
            t_kill = time.time()
            w.kill()
        except BaseException:
            w.kill()
            raise
        lat, missing = self._collect(self.args.ttl + 15, t_kill)
        limit = (self.args.ttl + 1) * 1000
        worst = max(lat) if lat else None
        self.samples.setdefault("death_ms", {})[str(size)] = [round(x, 1) for x in lat]
        return self.report.emit({
            "name": "fleet_host_death", "backend": self.backend, "size": size, "ttl_s":
            self.args.ttl, "n": len(lat), "expected": armed, "hosts_missed": len(missing),
            "p50_ms": _r(percentile(lat, 0.5)), "p99_ms": _r(percentile(lat, 0.99)),
            "max_ms": _r(worst), "target": f"every host, <= TTL + 1 s ({limit:g} ms)",
            "pass": bool(lat) and not missing and worst is not None and worst <= limit})

    def truth(self) -> dict[str, list[str]]:
        assert self.writer is not None
        snap = self.writer.snapshot()
        out: dict[str, list[str]] = {}
        for (svc, iid) in snap.instances:
            out.setdefault(svc, []).append(iid)
        return out

    def restart(self, size: int, steady_rate: float) -> dict[str, Any]:
        assert self.writer is not None
        say(f"{self.backend} {size}: full registry restart")
        cluster = self.servers.cluster
        self.freeze()
        expired0 = self.workers_sample()[1]
        wall0 = time.time()
        with RateSampler(self.servers, workers=[w.pid for w in self.workers]) as sampler:
            time.sleep(2)
            t_stop = time.time()
            cluster.stop()
            t_down = time.time()
            for proc in cluster.procs:  # all at once, on their data
                proc.start()
            self.probe_seq += 1
            inst = self.probe(self.probe_seq)
            armed = self._arm("put", HOT, [inst.key])
            # Serving again = the bench's own client's first write that succeeds (not every
            # member answering a probe within 1 s: under the fleet's reconnects they may not
            # for a long time, and a quorum is what the fleet needs).
            while True:
                t_write = time.time()
                try:
                    self.writer.register(inst)
                    break
                except RegistryError:
                    if time.time() - t_down > self.args.resync_timeout * 2:
                        raise
                    time.sleep(0.1)
            t_ready = t_written = time.time()
            lat, missing = self._collect(self.args.resync_timeout, t_ready)
            time.sleep(self.args.after_restart)
        peak, when = sampler.peak_per_s(t_ready - 0.5)
        peak_methods = (sampler.methods_between(sampler.peak_from, when)
                        if when is not None and sampler.peak_from is not None else {})
        after = sampler.methods_between(t_ready, t_ready + 10)
        sent = self.client_requests(t_stop)
        # every host's catalog equals the registry's, for the services it follows
        check = all_workers(self.workers, "check", truth=self.truth())
        mismatched = sum(c["mismatched"] for c in check)
        expired = self.workers_sample()[1] - expired0
        self.writer.deregister(inst.service, inst.id)
        worst = max(lat) if lat else None
        ratio = peak / steady_rate if steady_rate else None
        self.samples.setdefault("restart_resync_ms", {})[str(size)] = [round(x, 1) for x in lat]
        self.samples.setdefault("restart_cpu", {})[str(size)] = sampler.cpu_by_second(t_stop, 300)
        self.samples.setdefault("restart_rate", {})[str(size)] = [
            [round(t - t_stop, 2), round(v)] for t, v in sampler.samples]
        window = when - sampler.peak_from if when and sampler.peak_from else None
        ok = (bool(lat) and not missing and worst is not None
              and worst <= self.args.target_resync_s * 1000 and mismatched == 0
              and ratio is not None and ratio <= self.args.target_peak_ratio
              and window is not None and window <= PEAK_WINDOW_MAX_S)  # else: not resolved
        return self.report.emit({
            "name": "fleet_restart", "backend": self.backend, "size": size,
            "stop_s": round(t_down - t_stop, 2), "down_to_serving_s": round(t_ready - t_down, 2),
            "probe_write_s": round(t_written - t_write, 2),
            "note": "serving again = the first probe write that succeeded",
            "n": len(lat), "expected": armed, "hosts_missed": len(missing),
            "resync_p50_ms": _r(percentile(lat, 0.5)), "resync_p99_ms": _r(percentile(lat, 0.99)),
            "resync_max_ms": _r(worst), "catalogs_mismatched_after": mismatched,
            # leases / sessions that expired meanwhile (their hosts registered again)
            "expired_during": expired,
            "worker_gc_pauses": self.gc_pauses(wall0),
            # what the members and the simulator each got of the machine, second by second
            # from the stop: [s, members' cores, workers' cores]
            "cpu_cores_by_second": sampler.cpu_by_second(t_stop, 40),
            "peak_requests_per_s": round(peak, 1),
            "peak_at_s_after_serving": _r(when - t_ready if when else None, 1),
            "steady_requests_per_s": round(steady_rate, 1),
            "peak_over_steady": _r(ratio, 1),
            # the samples around the peak span this long: over 1.5 s the peak is a lower bound
            "peak_window_s": _r(window, 2),
            "peak_window_requests_by_method": peak_methods,
            "first_10s_requests_by_method_per_host": {
                k: round(v / len(self.hosts), 2) for k, v in after.items()},
            # ZooKeeper: what the hosts sent (zk_requests), by type; per second from the stop
            "client_requests_peak_window_by_type": by_type_between(
                sent, sampler.peak_from or 0.0, when or 0.0) if sent else None,
            "client_requests_first_10s_by_type_per_host": {
                k: round(v / len(self.hosts), 2)
                for k, v in by_type_between(sent, t_ready, t_ready + 10).items()}
            if sent else None,
            "client_requests_by_second": per_second(sent, t_stop)[:40] if sent else None,
            "target": f"every host within {self.args.target_resync_s:g} s; peak <= "
                      f"{self.args.target_peak_ratio:g} x steady",
            "pass": ok})

    def run(self) -> None:
        self.start()
        for k, size in enumerate(self.args.sizes):
            self.grow(size)
            st = self.steady(size)
            self.changes(size, st["worker_cpu_ms_per_host_s"])
            if not self.args.skip_death:
                self.death(size, k)
            if not self.args.skip_restart:
                self.restart(size, st["requests_per_s_total"])
                # etcd watchers resume wide and go back to their k watchers NARROW_AFTER later:
                # those creates belong to this restart, not to the next size's steady state
                last = k == len(self.args.sizes) - 1
                time.sleep(self.args.settle if last or self.backend != "etcd"
                           else max(self.args.settle, NARROW_AFTER[1]))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backends", default="etcd,zk")
    ap.add_argument("--sizes", default="250,500,1000",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--workers", type=int, default=8, help="worker processes for the hosts")
    ap.add_argument("--instances", type=int, default=10, help="instances per host")
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--watch-services", type=int, default=5,
                    help="services each host routes (0: all, no filter)")
    ap.add_argument("--ttl", type=float, default=10.0, help="lease TTL / session timeout")
    ap.add_argument("--resync", type=float, default=30.0, help="agent reconcile period")
    ap.add_argument("--start-attempts", type=int, default=3,
                    help="attempts to start one simulated host (each within the registry "
                    "timeout, 5 s) before the growth fails")
    ap.add_argument("--grow-step", type=int, default=100,
                    help="hosts started per step while the fleet grows")
    ap.add_argument("--grow-quiet", type=float, default=0.5,
                    help="after each growth step, wait until the workers use less than this "
                         "many cores + 1 ms/s per host (at most 120 s)")
    ap.add_argument("--worker-nice", type=int, default=10,
                    help="niceness of the worker processes (the registry members keep 0)")
    ap.add_argument("--start-parallel", type=int, default=16,
                    help="hosts a worker starts at once")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--steady", type=float, default=30.0)
    ap.add_argument("--changes", type=int, default=6)
    ap.add_argument("--change-gap", type=float, default=1.0)
    ap.add_argument("--change-timeout", type=float, default=10.0)
    ap.add_argument("--resync-timeout", type=float, default=60.0)
    ap.add_argument("--after-restart", type=float, default=5.0)
    ap.add_argument("--target-change-ms", type=float, default=250.0)
    ap.add_argument("--target-resync-s", type=float, default=10.0)
    ap.add_argument("--target-peak-ratio", type=float, default=3.0)
    ap.add_argument("--full-gc", choices=("between-phases", "python"), default="between-phases",
                    help="when the workers make full garbage collections: only between the "
                         "measured phases (each then freezes what it holds), or whenever Python's "
                         "thresholds say (a full collection walks all of a worker's hosts' heaps)")
    ap.add_argument("--etcd-procs", type=int, default=1,
                    help="GOMAXPROCS of each etcd member (0: Go's default, one per core; 3 "
                         "members share this machine's cores)")
    ap.add_argument("--zk-jvm", choices=("test", "server"), default="test",
                    help="the ZooKeeper members' JVM: the tests' (C1 only, 256 MiB, serial "
                         "collector) or as zkServer.sh starts one (-Xmx1000m, full JIT)")
    ap.add_argument("--zk-io", choices=("direct", "pools"), default="direct",
                    help="the ZooKeeper members' request threads: direct (a connection's "
                         "selector thread does its socket I/O, the commit processor serves the "
                         "reads: zoo.cfg nio.numWorkerThreads=0, commitProcessor."
                         "numWorkerThreads=0) or ZooKeeper's default pools")
    ap.add_argument("--zk-hosts", choices=("greenlets", "threads"), default="greenlets",
                    help="a ZooKeeper worker's hosts as threads, or as gevent greenlets "
                         "(bench/fleet_greenlets.py)")
    ap.add_argument("--skip-death", action="store_true")
    ap.add_argument("--skip-restart", action="store_true")
    ap.add_argument("--grpc-proxy", action="store_true",
                    help="etcd: hosts reach the cluster through one etcd grpc-proxy")
    ap.add_argument("--etcd-relay", action="store_true",
                    help="etcd: one source address per host through an HAProxy relay "
                         "(collapses under a full restart's reconnect storm at >= 500 hosts)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results")
    ap.add_argument("--bench-name", default=None,
                    help="result file bench/results/<NAME>-<backend>.json (default: fleet, "
                         "fleet-proxy with --grpc-proxy)")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    nofile = raise_nofile()

    logging.basicConfig(level=logging.ERROR)  # the bench's own client: only real trouble
    install_signal_handlers()
    report = Report()
    code = 0
    for backend in args.backends.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"discovery-fleet-{backend}-", dir="/tmp"))
        mark = report.mark()
        fleet = Fleet(args, backend, work, report)
        t0 = time.monotonic()
        failed, error = False, ""
        try:
            fleet.run()
        except Interrupted:
            say("interrupted: cleaning up")
            fleet.close()
            return 130
        except Exception:
            error = traceback.format_exc()
            say(f"{backend}: NOT MEASURED (the rest of it): {error[-3000:]}")
            report.unmeasured.append(backend)
            failed, code = True, 2
        finally:
            with contextlib.suppress(Exception):
                fleet.close()
        say(f"{backend}: took {time.monotonic() - t0:.0f}s; logs in {work}")
        if not args.no_save and len(report.rows) > mark[0]:  # a failed run: what it measured
            fleet.samples["nofile_soft_limit"] = nofile
            fleet.samples["workers"] = len(fleet.workers)
            if failed:
                fleet.samples["not_measured"] = [error[-600:]]
            report.save(args.bench_name or ("fleet-proxy" if args.grpc_proxy else "fleet"),
                        backend, mark, fleet.samples)
    if code == 0 and report.failed():
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
