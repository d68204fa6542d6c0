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
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import docker.errors  # noqa: E402  (binds ``docker`` too)
from common import (  # noqa: E402
    Interrupted,
    Report,
    Unmeasured,
    install_signal_handlers,
    keep_or_remove,
    say,
    summary,
)
from routing_churn import LOADS, run_churn  # noqa: E402
from routing_propagation import run_propagation  # noqa: E402
from routing_rig import Run, start_server  # noqa: E402

from discovery.errors import DiscoveryError  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    TEST_LABEL,
    build_example_image,
    cleanup_session_containers,
)
from tests.harness.servers import ServerCluster  # noqa: E402


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
                code = report.not_measured(backend, exc)
            finally:
                if server is not None:
                    server.stop()
        if "scale" in phases:
            import scale

            try:
                scale.run_scale(args, work, report)
            except (Unmeasured, DiscoveryError, OSError) as exc:
                code = report.not_measured("scale", exc)
    except Interrupted:
        say("interrupted: cleaning up")
        return 130
    finally:
        if run.client is not None:
            with contextlib.suppress(Exception):
                cleanup_session_containers(run.client)
            run.client.close()
        print(summary(report), flush=True)
        keep_or_remove(work, args.keep_logs or code == 2)
    return report.status(code)


if __name__ == "__main__":
    sys.exit(main())
