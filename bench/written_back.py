#!/usr/bin/env python3
"""The services prefix deleted (or every instance drained, or set to weight 0) by hand under a
live fleet: how soon
every instance is back, and what one host's watcher serves meanwhile, side by side: the
registry writing back what its watch saw deleted or changed of its own entries
(``discovery/registry/owned.py``) and the same code with that turned off (the agents put
their instances back at their reconcile, as before).

Per backend (``--backends``), on a real 3-member etcd cluster or ZooKeeper ensemble on
loopback (``tests/harness/servers.py``): ``--hosts`` (100) simulated hosts, each as ``discovery
up`` runs one: one registry client (its lease or session; the URL's ``spread=``,
``--spread`` s) that registers ``--instances`` (10) instances over ``--services`` services
(50 and 1,000, a pair of rows each: each service on 20 hosts, or one instance a service),
follows the services of its own instances (``--follow own``; ``all``: the whole catalog, as
with DNS or HTTP on, whose deliveries, 100 hosts' in one process, take this machine's CPU for
seconds: 200,000 for a 1,000-instance delete and its write-back; ``none``: no watch, as
``discovery agent`` alone, whose registry then watches its own keys only, ``zk_own`` and
``etcd_own``: the write-back's rows only, ``<stem>-alone-<backend>.json``; ``all`` likewise,
``<stem>-all-<backend>.json``) and reconciles every
``--resync`` s (±10 %; each host's first at a random moment within one period, as agents
started at different times) through ``node_snapshot``, registering again what is missing (the
agent's reconcile); one *observer*: the project's ``Watcher`` (the wipe guard with its
defaults, no router) on a registry client of its own. The hosts run in ``--workers`` (4)
processes at nice 10 (the etcd clients of one on one asyncio loop; they stand for other
machines: un-niced, the four took the ZooKeeper members' CPU and a write-back took up to
9 s); in a single one, 100 hosts'
deliveries and calls queued behind each other on one loop and one GIL, and the write-backs
came up to 1.1 s late (a run at ``2a330e9``: every instance back within 4.1 s, p50 3.9 s).

Then an operator deletes every instance under ``<prefix>/services`` (``--fault delete``; etcd:
one ``DeleteRange``; ZooKeeper: every instance node, the deletes sent together:
``tests/harness/fleet.delete_services``), or rewrites every instance as ``draining`` (``--fault
drain``, a script's read and write of each value: ``fleet.drain_services``; every host's
watcher drains them, and a service with none up serves nothing; "back" is then up again,
"empty" is no instance up), or rewrites every instance's weight as 0 (``--fault weight0``, the
same script: up, but HAProxy sends a server of weight 0 nothing; "back" and "empty" as for
``drain``, of instances serving: up and weight above 0). Measured, per row: seconds from the
delete's start until each instance was in the registry again (a watch of the bench's own): p50
/ p99 / max, and from the instance's own delete (p50 / max; ZooKeeper's deletes take a while);
the instances written back by the hosts' registries and those registered again by a reconcile;
the services the observer's catalog (what HAProxy, DNS and HTTP serve) held with no instance,
sampled every 0.1 s: the most at once and their service-seconds; whether its guard engaged.
Target of the new code: each instance back within ``spread`` + 1 s of its delete, no service
emptied.

Raw results: ``bench/results/written-back-<backend>.json`` (``--fault delete``),
``bench/results/changed-back-<backend>.json`` (``--fault drain``),
``bench/results/weight0-back-<backend>.json`` (``--fault weight0``: the write-back on, the
guard counting such drains off and on; the write-back off is ``drain``'s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import sys
import threading
import time
import unittest.mock
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import _r, measured, percentile, say  # noqa: E402
from fleet_host import put_back  # noqa: E402

from discovery.errors import RegistryError  # noqa: E402
from discovery.model import Instance  # noqa: E402
from discovery.registry import Change, Registry, RegistryURL, open_registry  # noqa: E402
from discovery.registry.base import FIRST_READ  # noqa: E402
from discovery.registry.etcd_aio import LoopThread  # noqa: E402
from discovery.registry.owned import Restorer  # noqa: E402
from discovery.retry import jittered  # noqa: E402
from discovery.watcher import guard  # noqa: E402
from discovery.watcher.core import Watcher  # noqa: E402
from tests.harness.fleet import as_draining, delete_services, drain_services  # noqa: E402
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble, wait_until  # noqa: E402

PREFIX = "/wb"


class Host:
    """One simulated ``discovery up``: its registry client, instances and reconcile loop."""

    def __init__(self, n: int, url: str, args: argparse.Namespace, services: int,
                 loop: LoopThread | None, stop: threading.Event) -> None:
        self.node = f"h{n:04d}"
        self.instances = [Instance(
            service=f"svc{(n * args.instances + i) % services:04d}",
            id=f"{self.node}:{n:08x}{i:04x}:{8000 + i}", node=self.node, address="127.0.0.1",
            port=8000 + i, registered_at=time.time(), written_at=time.time())  # as agents do
            for i in range(args.instances)]
        kw: dict[str, Any] = {"loop": loop} if loop is not None else {}
        self.registry: Registry = open_registry(url, ttl=args.ttl, **kw)
        self.resync, self.stop, self.reconciled = args.resync, stop, 0
        for inst in self.instances:
            self.registry.register(inst)
        only = (None if args.follow == "all"
                else sorted({i.service for i in self.instances}))
        if args.follow != "none":  # none: `discovery agent` alone, its own-key watches
            self.registry.watch(lambda change: None, FIRST_READ, only)  # one read, as watchers
        self.thread = threading.Thread(target=self._reconcile_loop, daemon=True)
        self.thread.start()

    def _reconcile_loop(self) -> None:
        wait = random.uniform(0, self.resync)  # each agent started at its own moment
        while not self.stop.wait(wait):
            wait = jittered(self.resync)
            try:
                self.reconciled += put_back(self.registry, self.node, self.instances)
            except RegistryError:
                continue

    @property
    def restored(self) -> int:
        restorer: Restorer = self.registry._restorer  # type: ignore[attr-defined]
        return restorer.restored


STEMS = {"delete": "written-back", "drain": "changed-back", "weight0": "weight0-back"}
REWRITE = {"drain": as_draining, "weight0": lambda i: dataclasses.replace(i, weight=0)}


class Back:
    """The bench's own watch: when each key was deleted (``drain``: drained or weighed 0),
    then put again (serving), after ``since``."""

    def __init__(self, drain: bool) -> None:
        self.drain = drain
        self.lock = threading.Lock()
        self.since: float | None = None
        self.gone: dict[tuple[str, str], float] = {}
        self.back: dict[tuple[str, str], float] = {}

    def __call__(self, change: Change) -> None:
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                return
            if change.kind == "delete":
                self.gone.setdefault(change.key, now)
            elif change.kind == "put" and change.instance is not None:
                if not self.drain or change.instance.serving:  # (ZooKeeper: one
                    self.back.setdefault(change.key, now)  # written back before the watch
                else:  # read its delete or drain tells only this)
                    self.gone.setdefault(change.key, now)
            elif change.kind == "reset" and change.snapshot is not None:
                for key, inst in change.snapshot.instances.items():
                    if not self.drain or inst.serving:
                        self.back.setdefault(key, now)

    def times(self, keys: set[tuple[str, str]]) -> tuple[list[float], list[float]]:
        """(from the delete's start, from each instance's own delete where the watch told
        it) of those back."""
        with self.lock:
            assert self.since is not None
            back = [k for k in keys if k in self.back]
            return ([self.back[k] - self.since for k in back],
                    [self.back[k] - self.gone[k] for k in back if k in self.gone])


def _log_level() -> None:
    """``BENCH_LOG_LEVEL`` (error: a host's write-back warns of each key; the rows say it)."""
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "error").upper(),
                        format="%(asctime)s %(processName)s %(name)s %(message)s")


def _timed(hosts: list[Host]) -> dict[tuple[str, str], float]:
    """When each host's write-back of a key returned having written it (monotonic: one clock
    for every process of this machine), by key: the write-back as its host saw it, apart from
    the queue of reads in front of the bench's own watch."""
    wrote: dict[tuple[str, str], float] = {}
    Key = tuple[str, str]

    def noted(done: dict[Key, str]) -> dict[Key, str]:
        now = time.monotonic()
        for key, what in done.items():
            if what:
                wrote.setdefault(key, now)
        return done

    for host in hosts:
        restorer: Restorer = host.registry._restorer  # type: ignore[attr-defined]
        restore, many = restorer._restore, restorer._many  # one key; many (ZooKeeper) at once
        restorer._restore = lambda key, doubt, restore=restore: noted(  # type: ignore[misc]
            {key: restore(key, doubt)})[key]
        if many is not None:
            restorer._many = lambda keys, many=many: noted(many(keys))
    return wrote


def _worker(url: str, numbers: list[int], args: argparse.Namespace, services_n: int,
            written_back: bool, conn: Any) -> None:
    """One worker process: its hosts (one asyncio loop for their etcd clients), ``ready``
    with their instances, then, told ``stop``, their write-back and reconcile counts and the
    CPU seconds the process spent in between."""
    os.nice(10)  # the hosts stand for other machines: never starving the members' CPU here
    with contextlib.suppress(OSError):  # (the group's weight, where the kernel groups by session)
        Path(f"/proc/{os.getpid()}/autogroup").write_text("10")
    _log_level()
    if not written_back:  # the code before: nothing is scheduled (a watch, a put with no lease)
        Restorer._schedule = lambda self, *_, **__: None  # type: ignore[method-assign]
    stop = threading.Event()
    loop = LoopThread() if url.startswith("etcd") else None
    with ThreadPoolExecutor(8) as pool:
        hosts = list(pool.map(lambda n: Host(n, url, args, services_n, loop, stop), numbers))
    if args.follow == "none":  # the fault once every host's own-key watches hold (not in
        # the ~0.5 s after its registers, which only its reconcile covers)
        own = [h.registry._restorer.own for h in hosts]  # type: ignore[attr-defined]
        wait_until(lambda: all(o.holds for o in own), 60, "the hosts' own-key watches")
    wrote = _timed(hosts)
    conn.send([i.key for h in hosts for i in h.instances])
    cpu = time.process_time()  # what the hosts spend from here: the fault, and the wave after
    conn.recv()  # stop
    stop.set()
    conn.send((sum(h.restored for h in hosts), sum(h.reconciled for h in hosts),
               time.process_time() - cpu, dict(wrote)))
    for host in hosts:
        host.registry.close(True)
    if loop is not None:
        loop.close()


def one(cluster: ServerCluster, args: argparse.Namespace, services_n: int, written_back: bool,
        tag: str, guard_drains: bool = True) -> dict[str, Any]:
    """One row; ``guard_drains``: the observer's wipe guard counts drains by another writer
    (False: as before ``a8039e4``, for a drain to weight 0 before ``d00e757``)."""
    with contextlib.ExitStack() as stack:
        if not guard_drains:
            stack.enter_context(unittest.mock.patch.object(guard, "foreign_drain",
                                                           lambda before, after: False))
        row = _one(cluster, args, services_n, written_back, tag)
    if args.fault == "delete":
        return row
    if not guard_drains:  # the target is the whole change's: the write-back and the guard
        row.update(target=None, **{"pass": None})
    elif row["pass"] is not None:
        row["pass"] = row["pass"] and row["observer_empty_services_most"] == 0
    return {**row, "guard_counts_drains": guard_drains}


def _one(cluster: ServerCluster, args: argparse.Namespace, services_n: int, written_back: bool,
         tag: str) -> dict[str, Any]:
    backend = cluster.scheme
    url = cluster.url(f"{PREFIX}{tag}") + f"?spread={args.spread:g}"
    ctx = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        workers = []
        for w in range(args.workers):
            conn, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, args=(
                url, list(range(w, args.hosts, args.workers)), args, services_n,
                written_back, theirs))
            proc.start()
            stack.callback(proc.join, 30)
            workers.append(conn)
        expected: set[tuple[str, str]] = set()
        for conn in workers:
            if not conn.poll(120):
                raise RuntimeError("a worker did not start its hosts")
            expected |= {(k[0], k[1]) for k in conn.recv()}
        counts: list[tuple[int, int, float, dict[tuple[str, str], float]]] = []
        stopped: list[bool] = []

        def stop_workers() -> None:  # once: now, or on the way out
            if stopped:
                return
            stopped.append(True)
            for conn in workers:
                conn.send("stop")
            counts.extend(conn.recv() for conn in workers if conn.poll(60))

        stack.callback(stop_workers)
        services = {k[0] for k in expected}
        observer_reg = open_registry(url, ttl=args.ttl)
        stack.callback(observer_reg.close)
        observer = Watcher(observer_reg, None)
        threading.Thread(target=observer.run, daemon=True).start()
        stack.callback(observer.stop)
        if not observer.wait_ready(60):
            raise RuntimeError("the observer's watcher did not start")
        reader_reg = open_registry(url, ttl=args.ttl)
        stack.callback(reader_reg.close)
        drain = args.fault != "delete"
        back = Back(drain)
        reader_reg.watch(back, FIRST_READ)  # its reset comes before ``since``: ignored
        deadline = time.monotonic() + 60
        while sum(observer.catalog.serving_count(s) for s in services) < len(expected):
            if time.monotonic() > deadline:
                raise RuntimeError("the observer never held the whole fleet")
            time.sleep(0.1)
        say(f"{backend}, written back {'on' if written_back else 'off'}: {args.hosts} hosts "
            f"in {args.workers} processes, {len(expected)} instances; "
            f"{args.fault} of every instance of {RegistryURL.parse(url).services_root}")
        empty_most, empty_service_s = 0, 0.0
        with back.lock:
            back.since = start = time.monotonic()
        deleted = (drain_services(url, rewrite=REWRITE[args.fault]) if drain
                   else delete_services(url))
        deleted_in = time.monotonic() - start
        end = start + args.timeout
        while time.monotonic() < end:
            empty = sum(1 for s in services if not observer.catalog.serving_count(s))
            empty_most, empty_service_s = max(empty_most, empty), empty_service_s + empty * 0.1
            with back.lock:
                done = expected <= back.back.keys()
            if done and not empty:
                break
            time.sleep(0.1)
        times, own = back.times(expected)
        status = observer.guard.status
        stop_workers()
        row = {
            "backend": backend, "fault": args.fault,
            "written_back": "on" if written_back else "off",
            "hosts": args.hosts, "workers": args.workers, "instances": len(expected),
            "services": len(services), "spread_s": args.spread, "resync_s": args.resync,
            "follow": args.follow,
            "deleted": deleted, "delete_took_s": _r(deleted_in), "back": len(times),
            "back_p50_s": _r(percentile(times, 0.5)), "back_p99_s": _r(percentile(times, 0.99)),
            "back_max_s": _r(max(times)) if times else None,
            "deletes_seen": len(own),
            "back_after_own_delete_p50_s": _r(percentile(own, 0.5)),
            "back_after_own_delete_max_s": _r(max(own)) if own else None,
            "written_back_writes": sum(c[0] for c in counts),
            "reconcile_writes": sum(c[1] for c in counts),
            # each host's share of its process's CPU over the row (the fault, the wave after,
            # the steady state around them): a host with a core of its own spends that
            "host_cpu_ms": _r(1000 * sum(c[2] for c in counts) / args.hosts),
            # when its host's write-back returned, for those written back (not the reconcile's)
            "written_back_p50_s": _r(percentile(wrote := [t - start for c in counts
                                                          for t in c[3].values()], 0.5)),
            "written_back_max_s": _r(max(wrote)) if wrote else None,
            "row_s": _r(time.monotonic() - start),
            "observer_empty_services_most": empty_most,
            "observer_empty_service_s": _r(empty_service_s),
            "guard_engaged": status.engaged, "guard_held_total": status.held_total,
            "target": None if not written_back else (
                "each serving again within spread + 1 s of its drain, no service with none "
                "serving"
                if drain else
                "each back within spread + 1 s of its delete, no service emptied"),
            "pass": (len(times) == len(expected) and len(counts) == args.workers
                     and max(own) <= args.spread + 1.0 and (drain or empty_most == 0))
            if written_back else None,
        }
        return row


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="etcd,zk")
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--workers", type=int, default=4,
                    help="processes the hosts run in (each host's own would be the truth)")
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--services", default="50,1000",
                    help="services the instances are spread over, one row pair each")
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--resync", type=float, default=30.0)
    ap.add_argument("--spread", type=float, default=3.0)
    ap.add_argument("--follow", choices=("own", "all", "none"), default="own",
                    help="what each host's watch follows: the services of its instances, or "
                         "all; none: no watch (`discovery agent` alone: the write-back rides "
                         "on watches of the host's own keys), the write-back's rows only")
    ap.add_argument("--fault", choices=tuple(STEMS), default="delete",
                    help="what the operator does: delete the services prefix, or rewrite every "
                         "instance as draining, or as weight 0")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds after the delete a row waits for everything to be back "
                         "(above the observer's wipe guard hold, 45 s: what it lets go shows)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    _log_level()
    code = 0
    for backend in args.backends.split(","):
        def run(work: Path, report: Any, backend: str = backend) -> list[dict[str, Any]]:
            cluster = (EtcdCluster(3, work, go_procs=1) if backend == "etcd"
                       else ZkEnsemble(3, work))
            cluster.start()
            try:
                variants = {"delete": [(False, True), (True, True)],
                            "drain": [(False, False), (False, True), (True, False),
                                      (True, True)],
                            "weight0": [(True, False), (True, True)]}[args.fault]
                if args.follow != "own":  # the rows of the write-back and the guard's count
                    variants = [(True, True)]
                return [report.emit(one(cluster, args, int(n), on, f"{backend}{n}x{int(on)}"
                                        f"{int(drains)}", drains))
                        for n in args.services.split(",") for on, drains in variants]
            finally:
                cluster.stop()

        code = max(code, measured(
            STEMS[args.fault] + {"own": "", "none": "-alone", "all": "-all"}[args.follow], backend,
            f"the prefix's {args.fault}", run, save=not args.no_save))
        if code == 130:  # Ctrl-C: not the next backend
            break
    return code


if __name__ == "__main__":
    sys.exit(main())
