"""``bench/fleet.py``'s fleet: the 3-member cluster (and grpc-proxy or relay), the worker
processes, the growth of the fleet, and the calls the measured phases (:mod:`fleet_phases`) make
to the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from common import Report, say
from fleet_host import HOT, PREFIX, VICTIM_BASE, from_own_source, source_ip
from fleet_procs import Relay, WorkerProc, all_workers, source_addresses
from fleet_servers import CLK_TCK, Servers, socket_bytes
from zk_requests import merge

from discovery.model import Instance
from discovery.registry import Registry, open_registry


class FleetSetup:
    def __init__(self, args: argparse.Namespace, backend: str, work: Path,
                 report: Report) -> None:
        self.args, self.backend, self.work, self.report = args, backend, work, report
        self.servers = Servers(backend, work, args.zk_jvm, args.zk_io, args.etcd_procs,
                               args.ttl)
        self.relay: Relay | None = None
        self.proxy: Any = None
        self.workers: list[WorkerProc] = []
        self.hosts: list[int] = []
        self.samples: dict[str, Any] = {}
        self.gc_model: dict[str, float] = {}  # FleetSetup.freeze: a host's share of a worker's heap
        self.writer: Registry | None = None
        self.probe_seq = 0
        self.worker_hosts: dict[int, int] = {}  # worker pid -> hosts it holds
        self.worker_env: dict[str, str] = {}  # (source_addresses)

    @property
    def by_pid(self) -> bool:
        """etcd hosts sharing 127.0.0.1 (``--shared-source``): bytes are counted per worker
        process and divided by its hosts (a per-host mean per process)."""
        return self.backend == "etcd" and self.relay is None and not self.own_sources

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
            targets = self.targets()
            say(f"etcd: relay HAProxy with {len(every) * len(targets)} ports (one source "
                "address per host)")
            self.relay = Relay(every, targets, self.work)
        # The bench's own client measures when the registry serves again: it reconnects
        # without the fleet's resume spread (spread=0), or "serving again" would come late
        self.writer = open_registry(self.direct_url() + "?spread=0", ttl=self.args.ttl,
                                    timeout=15.0)
        if self.own_sources:  # each host connects from its own 127.20.x.y (bench/srcaddr.c)
            self.worker_env = source_addresses(self.work, self.targets())
        self.workers = [self.worker(f"worker{i}") for i in range(self.args.workers)]

    def worker(self, name: str) -> WorkerProc:
        """A worker process (its log ``<name>.log``), its hosts' source addresses their own."""
        return WorkerProc(self.args, self.work / f"{name}.log", self.backend, self.worker_env)

    def direct_url(self) -> str:
        return self.servers.cluster.url(PREFIX)

    @property
    def own_sources(self) -> bool:
        """etcd hosts with their own source address through ``bench/srcaddr.c``."""
        return self.backend == "etcd" and self.relay is None and not self.args.shared_source

    def targets(self) -> list[int]:
        """The ports the etcd hosts connect to: the proxy's, or the members'."""
        return [self.proxy.port] if self.proxy is not None else self.servers.cluster.client_ports

    def url_of(self, n: int) -> str:
        if self.relay is not None:
            url = self.relay.url(n)
        else:
            url = self.proxy.url(PREFIX) if self.proxy is not None else self.direct_url()
            if self.own_sources:  # its own address, which bench/srcaddr.c connects it from
                url = from_own_source(url, n)
        own = self.args.own or ("services" if self.proxy is not None else None)  # (etcd's)
        query = [*([] if self.args.spread is None else [f"spread={self.args.spread:g}"]),
                 *([] if own is None else [f"own={own}"])]
        return f"{url}?{'&'.join(query)}" if query else url

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


    def truth(self) -> dict[str, list[str]]:
        assert self.writer is not None
        snap = self.writer.snapshot()
        out: dict[str, list[str]] = {}
        for (svc, iid) in snap.instances:
            out.setdefault(svc, []).append(iid)
        return out
