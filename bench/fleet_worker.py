"""A ``bench/fleet.py`` worker process: many simulated hosts (:mod:`fleet_host`) driven by the
parent over a pipe, one JSON command a line (``add``, ``stats``, ``arm``, ``collect``, ...).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleet_host import (
    Host,
    install_etcd_host_channels,
    install_zk_source_binding,
    raise_nofile,
    relieve_grpc_process_costs,
)
from procs import cpu_ticks, rss_kib
from zk_requests import RequestLog
from zk_requests import install as count_zk_requests

from discovery.model.catalog import Catalog
from discovery.registry.etcd_aio import LoopThread
from discovery.registry.reads import ReadCounts
from discovery.retry import jittered

FULL_GC_NEVER = 10**9  # gen-2 threshold (full collections after this many gen-1 ones)
GC_PAUSE_MIN_S = 0.02  # a worker's garbage collections counted as pauses from this long

#: reconciles running at once in one worker process: more than its hosts that are due within
#: a registry call's timeout (250 hosts, --resync 30 s: ~42 within 5 s), so a reconcile that
#: waits for a registry that is down does not hold back the others (as one thread did: their
#: backlog then ran all at once when the registry came back)
RECONCILE_THREADS = 64


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
    install_zk_source_binding()
    install_etcd_host_channels()
    relieve_grpc_process_costs()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we go
    if args.full_gc == "between-phases":  # FleetSetup.freeze: none on its own
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
            elif cmd == "freeze":  # between phases: see FleetSetup.freeze
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
