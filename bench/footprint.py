#!/usr/bin/env python3
"""Per-host footprint (issue 11 §5): ``discovery up`` (agent, watcher, DNS and HTTP in one
process) with 100 containers of its own and a 10,000-instance catalog.

A single-node etcd (the harness's ``EtcdCluster(1)``; ``--backend zk``: a single ZooKeeper,
``ZkEnsemble(1)``) gets ``--foreign`` (10,000) instances
of 100 *other* nodes over 20 services (``svc0`` … ``svc19``, 500 each), written directly by a
raw client (``tests/harness/fleet.py:fill_foreign``: what those hosts' agents would have
written, index entries included). Then ``discovery up --registry … --node fp`` starts with
its DNS and HTTP endpoints on free loopback ports, routing ``--route`` services (default: its
own service and ``svc0`` … ``svc4``: 100 + 2,500 servers in HAProxy), and ``--containers``
(100) example-app containers (host network, ``discovery.check=tcp``) are started 8 at a time
(``bench/registration_rig.py``'s ``Containers``). Once the registry holds the 100 and the HTTP API
shows the whole catalog (10,100 instances), it is asked one DNS query and one ``/v1/services``
read (``--no-serve``: not; the runs before 2026-12-08 were not: the DNS zone and the kept
answer were not built), and after ``--settle`` s ``/proc`` is read every second for
``--seconds`` (30, one resync period):

* RSS of the ``discovery up`` process (max over the window; VmHWM, anon / file, PSS,
  threads) and its CPU (% of one core). Target: RSS <= 80 MB (10^6 bytes).
* HAProxy's RSS beside it (master + workers, summed; PSS too: they share pages).

Raw result: ``bench/results/footprint-<backend>.json``. Containers are removed by id at the end
(and anything left with this run's harness label); the registry, ``discovery up`` and HAProxy
are stopped by their pids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker
from common import CLK_TCK, Interrupted, Report, install_signal_handlers, keep_or_remove, say
from procs import HAPROXY_BIN, Daemon, children_of, cpu_ticks, discovery_cmd
from registration_rig import Containers

from discovery.registry import open_registry
from tests.harness.dockerd import SESSION_ID, build_example_image, cleanup_session_containers
from tests.harness.fleet import fill_foreign
from tests.harness.servers import EtcdCluster, ZkEnsemble
from tests.harness.util import free_port

TARGET_MB = 80.0
PREFIX = "/fp"
NODE = "fp"
OWN = "fp-app"


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    return out


def haproxy_pids(state: Path) -> list[int]:
    try:
        master = int((state / "haproxy.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [master, *children_of(master)]


def http_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def catalog_size(port: int) -> int:
    services = http_json(port, "/v1/catalog/services")
    names = list(services)
    return sum(len(http_json(port, f"/v1/catalog/service/{name}")) for name in names)


def serve_once(dns: int, http: int) -> dict[str, Any]:
    """What a host serving DNS and HTTP holds once asked: one DNS query (the zone built) and
    one ``/v1/services`` read (the whole catalog's answer, kept by service)."""
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(dns), "+short", "+time=5", "+tries=1",
                          "svc0.service.discovery", "A"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/services", timeout=30) as r:
        body = r.read()
    return {"dns_answers": len(out), "v1_services_bytes": len(body)}


def wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


def run(args: argparse.Namespace, work: Path, report: Report) -> None:
    cluster = (EtcdCluster(1, work / "etcd") if args.backend == "etcd"
               else ZkEnsemble(1, work / "zk"))
    client = docker.from_env(timeout=60)
    containers = Containers(build_example_image(client), parallel=8)
    up: Daemon | None = None
    state = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))  # short: HAProxy's sockets
    try:
        cluster.start()
        url = cluster.url(PREFIX)
        say(f"writing {args.foreign} instances of 100 other nodes")
        t0 = time.monotonic()
        fill_foreign(url, args.foreign)
        say(f"written in {time.monotonic() - t0:.1f}s")
        dns, http = free_port(), free_port()
        routes = [OWN, *(f"svc{i}" for i in range(args.route - 1))]
        argv = ["up", "--registry", url, "--node", NODE, "--state-dir", str(state),
                "--haproxy-bin", HAPROXY_BIN, "--dns", f"127.0.0.1:{dns}",
                "--http", f"127.0.0.1:{http}"]
        for name in routes:
            argv += ["--service", f"{name}:{free_port()}"]
        up = Daemon(discovery_cmd(*argv, log_level="warning"), work / "up.log").start()
        wait(lambda: http_status(http, "/v1/health") in (200, 503), 60,
             "discovery up's HTTP API")  # 503: not every routed service has a server yet
        empty = proc_status(up.pid)
        say(f"discovery up running (pid {up.pid}); starting {args.containers} containers")

        def labels(port: int) -> dict[str, str]:
            return {"discovery.service": OWN, "discovery.port": str(port),
                    "discovery.check": "tcp"}

        t0 = time.monotonic()
        containers.start([f"fp-{i}" for i in range(args.containers)], labels, None)
        started_s = time.monotonic() - t0
        reg = open_registry(url)
        try:
            wait(lambda: len(reg.node_snapshot(NODE).instances) >= args.containers, 120,
                 f"{args.containers} instances of node {NODE} in the registry")
        finally:
            reg.close()
        expected = args.foreign + args.containers
        size = wait(lambda: (n := catalog_size(http)) >= expected and n, 60,
                    f"a catalog of {expected} in the HTTP API")
        served = serve_once(dns, http) if args.serve else {}
        say(f"catalog {size}; settling {args.settle:g}s, then measuring {args.seconds:g}s")
        time.sleep(args.settle)
        t1, ticks0 = time.monotonic(), cpu_ticks(up.pid, tree=False)
        samples: list[dict[str, Any]] = []
        while time.monotonic() - t1 < args.seconds:
            me = proc_status(up.pid)
            hp = [proc_status(p) for p in haproxy_pids(state)]
            samples.append({"t": round(time.monotonic() - t1, 1), "rss_kib": me.get("VmRSS"),
                            "haproxy_rss_kib": sum(h.get("VmRSS", 0) for h in hp),
                            "haproxy_pss_kib": sum(h.get("Pss", 0) for h in hp),
                            "haproxy_processes": len(hp)})
            time.sleep(1.0)
        wall = time.monotonic() - t1
        cpu = 100.0 * (cpu_ticks(up.pid, tree=False) - ticks0) / CLK_TCK / wall
        last = proc_status(up.pid)
        rss_kib = max([s["rss_kib"] or 0 for s in samples] + [last.get("VmRSS", 0)])
        hp_rss = max(s["haproxy_rss_kib"] for s in samples)
        hp_pss = max(s["haproxy_pss_kib"] for s in samples)
        rss_mb = rss_kib * 1024 / 1e6
        report.emit({
            "name": "footprint_up", "backend": args.backend, "containers": args.containers,
            "containers_started_s": round(started_s, 1), "catalog": size,
            "routed_services": len(routes), "window_s": round(wall, 1),
            "rss_mb": round(rss_mb, 1), "rss_mib": round(rss_kib / 1024, 1),
            "hwm_mb": round(last.get("VmHWM", 0) * 1024 / 1e6, 1),
            "rss_anon_mib": round(last.get("RssAnon", 0) / 1024, 1),
            "rss_file_mib": round(last.get("RssFile", 0) / 1024, 1),
            "pss_mib": round(last.get("Pss", 0) / 1024, 1),
            "rss_before_containers_mb": round(empty.get("VmRSS", 0) * 1024 / 1e6, 1),
            "threads": last.get("Threads"), "cpu_pct_of_one_core": round(cpu, 2),
            "haproxy_rss_mb": round(hp_rss * 1024 / 1e6, 1),
            "haproxy_pss_mb": round(hp_pss * 1024 / 1e6, 1),
            "haproxy_processes": samples[-1]["haproxy_processes"] if samples else 0,
            "served_before_window": served,
            "target": f"RSS <= {TARGET_MB:g} MB", "pass": rss_mb <= TARGET_MB})
        report.samples = samples  # type: ignore[attr-defined]
    finally:
        if up is not None:
            up.stop(signal.SIGTERM, timeout=20)
        for pid in haproxy_pids(state):  # normally gone with `up`
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        say(f"removing {len(containers.ids)} containers")
        with contextlib.suppress(Exception):
            containers.remove()
        with contextlib.suppress(Exception):
            cleanup_session_containers(client, SESSION_ID)
        client.close()
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("etcd", "zk"), default="etcd")
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--foreign", type=int, default=10_000)
    ap.add_argument("--route", type=int, default=6,
                    help="services routed through HAProxy: its own and svc0 .. svc<N-2>")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--no-serve", dest="serve", action="store_false",
                    help="do not ask one DNS query and one /v1/services read before the window")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.containers <= 500 or not 0 <= args.foreign <= 100_000:
        ap.error("--containers 0..500, --foreign 0..100000")
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="discovery-footprint-"))
    report = Report()
    mark = report.mark()
    code = 0
    try:
        run(args, work, report)
    except Interrupted:
        say("interrupted: cleaned up")
        return 130
    except Exception as exc:
        code = report.not_measured("footprint", exc)
    if code == 0 and not args.no_save:
        report.save("footprint", args.backend, mark, getattr(report, "samples", []))
    keep_or_remove(work, code == 2 or args.keep_logs)
    return report.status(code)


if __name__ == "__main__":
    sys.exit(main())
