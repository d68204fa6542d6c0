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
address, so the workers preload ``bench/srcaddr.c`` (built with the system's C compiler at the
start): a host's registry URL names its own address (``etcd://127.20.0.7:<member port>,...``)
and the library turns that connect() into one from 127.20.0.7 to 127.0.0.1 (nothing else of
the backend changes; ``--shared-source``: every etcd host from 127.0.0.1, as before
2026-12-07, its bytes counted per worker process and divided by its hosts). **Each host has
its own connection**: gRPC shares one connection among a process's channels with equal target
and arguments, so every host's channels also carry their own user agent
(``discovery.registry.etcd_aio.Endpoint`` wrapped the same way: the asyncio channel of its
streams gets the same options). A host's agent and watcher share one registry client (one
session or lease; on etcd one connection for the calls and the streams), as one
``discovery up`` process does; the etcd hosts of a worker process run their streams and lease
keepers on one shared asyncio loop (``open_registry(..., loop=)``), as any process holding
many registries does. ``--etcd-relay`` gave etcd hosts their own source addresses before,
through one HAProxy relay (``server ... source <host address>``, one loopback port per host
and member); it measures the steady state the same, but collapses under a full restart's
reconnect storm from 500 hosts on (docs/benchmarks.md).

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
  host resynced within 10 s of the registry serving again, peak <= 3 x steady. The samples
  go on until what the restart sets off later is over (``--after-restart``): etcd watchers
  resume wide and return to their per-service watchers 10-60 s later (``NARROW_AFTER``), and
  the watches of each host's own keys resume 3-20 resume spreads after the loss
  (``owned.OWN_LATER``); those count in the restart's peak.
* **servers**: RSS and CPU of every member (and of the relay), data size, watches, sessions.

**Modules.** This script parses the options and runs each backend; the rest is in
``fleet_host.py`` (one simulated host and the hooks that give it its own connection),
``fleet_worker.py`` (a worker process: many hosts, driven over a pipe), ``fleet_procs.py``
(the parent's handle on a worker process, and the relay), ``fleet_servers.py`` (the members'
counters, RSS and CPU, the restart's rate sampler, the kernel's byte counts),
``fleet_setup.py`` (the cluster, the workers and the growth of the fleet), ``fleet_phases.py``
(the four measured phases) and ``fleet_greenlets.py`` (a ZooKeeper worker on gevent).

Raw results: ``bench/results/fleet-etcd.json``, ``fleet-zk.json`` (``--grpc-proxy``:
``fleet-proxy-etcd.json``, the hosts behind one ``etcd grpc-proxy`` instead of the members;
``--ttl 30 --spread 10 --bench-name fleet-ttl30``: ``fleet-ttl30-*.json``, a longer session
timeout, which the ZooKeeper members are then configured to admit, and resume spread;
``--backends zk --spread 6 --bench-name fleet-spread6``: ``fleet-spread6-zk.json``, ZooKeeper
hosts that wait a period of ``spread=`` while the whole ensemble is down).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Interrupted, Report, install_signal_handlers, say
from fleet_host import raise_nofile
from fleet_phases import Fleet
from fleet_worker import worker_main


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
    ap.add_argument("--spread", type=float, default=None,
                    help="the hosts' resume spread (the registry URL's spread=, seconds; "
                         "default: the URL's own, 3 s, at most a third of --ttl)")
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
    ap.add_argument("--after-restart", type=float, default=None,
                    help="seconds the restart's samples go on after every host resynced "
                         "(default: until the later resumes a restart sets off are over, "
                         "~62 s after the stop at spread=3; 5 until 2026-12-06)")
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
    ap.add_argument("--own", choices=("keys", "services", "off"), default=None,
                    help="the hosts' registry URL's own=: how a host follows its own entries "
                         "no watch of it follows (default: services with --grpc-proxy, as "
                         "docs/operations.md advises behind one; else the URL's own, keys)")
    ap.add_argument("--shared-source", action="store_true",
                    help="etcd: every host connects from 127.0.0.1, as before 2026-12-07 "
                         "(default: each from its own 127.20.x.y, bench/srcaddr.c preloaded)")
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
    if args.own == "services" and "zk" in args.backends.split(","):
        ap.error("--own services is etcd's (own=services: etcd:// only)")
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
    return report.status(code)


if __name__ == "__main__":
    sys.exit(main())
