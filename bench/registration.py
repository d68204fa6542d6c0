#!/usr/bin/env python3
"""Registration benchmark: Docker health/kill events → registry, per backend; agent RSS and CPU.

For each backend (etcd single node, then ZooKeeper single node: one backend at a time,
sequentially, in the same run) this script starts a private server on a free loopback port,
its own ``discovery agent`` process (own ``--node``, own prefix), and then:

1. **latency**: starts ``--containers`` example-app containers (host network, 127.0.0.1, a
   Docker HEALTHCHECK every ``--health-interval`` s, labels ``discovery.service`` and
   ``discovery.port``), waits until every one is registered, then ``docker kill``s them one by
   one ``--kill-gap`` s apart (``--stop-with stop``: ``docker stop``). Latency = (time the
   bench's registry watch delivered the put/delete, ``time.time_ns()``) - (Docker's
   ``timeNano`` of ``health_status: healthy`` / ``kill``). Both clocks are this host's, so no
   clock skew; the figure includes the watch notification delay, i.e. it is conservative.
2. **idle**: starts ``--idle-containers`` containers checked by the agent itself
   (``discovery.check=tcp``, default interval 2 s; ``--idle-check docker`` to follow a Docker
   HEALTHCHECK instead), waits until all are registered, lets it settle, then reads the agent's
   ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, RssFile, Threads), ``smaps_rollup`` (Pss)
   and ``/proc/<pid>/stat`` (utime+stime) over an ``--idle-seconds`` window → RSS and CPU in
   percent of one core.

Output: one JSON line per metric on stdout (``backend, metric, n, p50_ms, p99_ms, max_ms,
target, pass``, …), then a human table. Progress goes to stderr. Every container (by id),
agent and server (by pid) this script started is removed/stopped on exit, Ctrl-C included.
See docs/benchmarks.md for figures and the exact command.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
import docker.errors  # noqa: E402
from common import Interrupted, keep_or_remove, machine, say, signals_unwind, started, write_result  # noqa: E402
from registration_phases import Options, run_idle, run_latency  # noqa: E402
from registration_rig import Agent, Containers, Recorder, docker_retry  # noqa: E402

from discovery.registry import Registry, open_registry  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    build_example_image,
    cleanup_session_containers,
)
from tests.harness.servers import EtcdCluster, ServerCluster, ZkEnsemble  # noqa: E402

BACKENDS = ("etcd", "zk")


def guarded(what: str, fn: Callable[[], object]) -> None:
    """Cleanup step: never let one failure skip the next step."""
    try:
        fn()
    except Exception as exc:
        say(f"cleanup: {what} failed: {exc!r}")


def run_backend(backend: str, opts: Options, image: str, token: str,
                emit: Callable[[dict[str, Any]], None]) -> None:
    node = f"bench-{backend}"
    svc_lat = f"bench-{token}-{backend}-lat"
    svc_idle = f"bench-{token}-{backend}-idle"
    server: ServerCluster = (EtcdCluster(1, opts.work / "etcd") if backend == "etcd"
                             else ZkEnsemble(1, opts.work / "zk"))
    containers = Containers(image, opts.parallel)
    agent: Agent | None = None
    registry: Registry | None = None
    recorder: Recorder | None = None
    client = docker.from_env(timeout=60)
    started_at, machine_info = started(), machine()
    rows: list[dict[str, Any]] = []

    def emit_row(row: dict[str, Any]) -> None:
        rows.append(row)
        emit(row)

    try:
        docker_retry("docker ping", client.ping)
        say(f"{backend}: starting a single-node server on loopback")
        server.start()
        url = server.url(f"/bench-{token}-{backend}")
        registry = open_registry(url)
        recorder = Recorder(client, registry, {svc_lat, svc_idle}).start()
        agent = Agent(url, node, opts.work / f"agent-{backend}.log", opts.agent_log_level,
                      opts.agent_args).start()
        try:
            agent.wait_log("docker: connected", timeout=15)
        except TimeoutError:  # the log wording changed? carry on if it is still running
            if not agent.alive:
                raise
            say(f"{backend}: no 'docker: connected' in the agent log; assuming it is up")
        time.sleep(0.5)
        base = agent.proc_sample()
        say(f"{backend}: agent pid {agent.pid} up ({url}, node {node}), "
            f"RSS {base['VmRSS'] / 1024:.1f} MiB with nothing registered")
        if opts.containers > 0:
            run_latency(backend, opts, svc_lat, containers, agent, recorder, emit_row)
        if opts.idle_containers > 0:
            run_idle(backend, opts, svc_idle, containers, agent, recorder, emit_row,
                     base["VmRSS"])
        code = agent.stop()
        say(f"{backend}: agent stopped (exit {code})")
        bench = "registration" if opts.containers > 0 else f"registration-idle-{opts.idle_check}"
        path = write_result(bench, backend, started_at=started_at, machine_info=machine_info,
                            summary={"rows": rows}, samples=opts.samples.get(backend, {}))
        say(f"{backend}: raw result written to {path}")
    finally:
        say(f"{backend}: cleaning up")
        if agent is not None:
            guarded("stopping the agent", agent.stop)
        guarded("removing containers", containers.remove)
        if recorder is not None:
            guarded("stopping the recorder", recorder.stop)
        if registry is not None:
            guarded("closing the registry client", lambda: registry.close(revoke=False))
        guarded(f"stopping {backend}", server.stop)
        guarded("closing the docker client", client.close)


# --------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'backend':<8} {'metric':<22} {'n':>4}  {'p50':>9} {'p99':>9} {'max':>9}  "
             f"{'target':<18} {'result':<6}"]
    for r in rows:
        if "p50_ms" in r:
            cells = [f"{r['p50_ms']:>7.1f}ms", f"{r['p99_ms']:>7.1f}ms", f"{r['max_ms']:>7.1f}ms"]
        elif r["metric"] == "agent_rss":
            cells = [f"{r['rss_mib']:>6.1f}MiB", f"hwm {r['hwm_mib']:.0f}", ""]
        else:
            cells = [f"{r['cpu_pct_of_one_core']:>7.2f}%", "(of one", "core)"]
        result = {True: "PASS", False: "FAIL", None: "-"}[r["pass"]]
        lines.append(f"{r['backend']:<8} {r['metric']:<22} {r['n']:>4}  {cells[0]:>9} "
                     f"{cells[1]:>9} {cells[2]:>9}  {r['target'] or '(none)':<18} {result:<6}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Docker event → registry latency per backend, and agent RSS/CPU at idle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, run one after the other: etcd, zk")
    p.add_argument("--containers", type=int, default=60,
                   help="containers per backend for the latency phase (>= 50 for the issue)")
    p.add_argument("--health-interval", type=float, default=5.0,
                   help="Docker HEALTHCHECK interval (s) of the latency-phase containers")
    p.add_argument("--kill-gap", type=float, default=0.05, help="pause between docker kills (s)")
    p.add_argument("--stop-with", choices=("kill", "stop"), default="kill",
                   help="end the latency containers with `docker kill` (SIGKILL) or `docker stop` "
                        "(SIGTERM): both emit the `kill` event the latency is measured from")
    p.add_argument("--idle-containers", type=int, default=100,
                   help="registered containers during the RSS/CPU measurement (0: skip)")
    p.add_argument("--idle-check", choices=("tcp", "docker"), default="tcp",
                   help="idle-phase health check: agent-side tcp, or a Docker HEALTHCHECK")
    p.add_argument("--idle-health-interval", type=float, default=30.0,
                   help="Docker HEALTHCHECK interval (s) with --idle-check docker")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="RSS/CPU window (s); 30 = the agent's default --resync, so the window "
                        "holds one reconcile pass")
    p.add_argument("--idle-settle", type=float, default=3.0,
                   help="pause after the last registration before the window (s)")
    p.add_argument("--parallel", type=int, default=4, help="containers started/removed at once")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="max wait (s) for all registrations / removals per phase")
    p.add_argument("--agent-log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                   help="extra `discovery agent` argument (repeatable): --agent-arg=--resync=30")
    p.add_argument("--py-spy", metavar="BIN",
                   help="py-spy binary: sample the agent during both phases (folded stacks in the "
                        "work dir; implies --keep-logs; perturbs the figures: profile runs only)")
    p.add_argument("--json-out", type=Path, help="also write the JSON lines to this file")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the work dir (agent and server logs) and print its path")
    args = p.parse_args(argv)
    if args.py_spy:
        args.keep_logs = True
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        p.error(f"--backends: unknown {bad or '(none)'}; choose from {', '.join(BACKENDS)}")
    if not 0 <= args.containers <= 500 or not 0 <= args.idle_containers <= 500:
        p.error("--containers / --idle-containers: 0..500")
    if not 0 < args.idle_seconds <= 300 or not 0 < args.timeout <= 600:
        p.error("--idle-seconds: (0, 300]; --timeout: (0, 600]")
    if not 1 <= args.parallel <= 16:
        p.error("--parallel: 1..16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="discovery-bench-"))
    opts = Options(
        backends=args.backends, containers=args.containers,
        idle_containers=args.idle_containers, idle_seconds=args.idle_seconds,
        idle_settle=args.idle_settle, idle_check=args.idle_check,
        idle_health_interval=args.idle_health_interval, health_interval=args.health_interval,
        kill_gap=args.kill_gap, stop_with=args.stop_with, parallel=args.parallel,
        timeout=args.timeout,
        agent_log_level=args.agent_log_level, agent_args=list(args.agent_arg),
        py_spy=args.py_spy, work=work)
    token = secrets.token_hex(3)
    rows: list[dict[str, Any]] = []
    out = args.json_out.open("w") if args.json_out else None

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    client = docker.from_env(timeout=60)
    t_start = time.monotonic()
    failed = False
    errors: list[str] = []
    with signals_unwind():
        try:
            say(f"run {token}: backends {', '.join(opts.backends)} (one after the other), "
                f"work dir {work}, container session label {SESSION_ID}")
            docker_retry("docker ping", client.ping)
            image = build_example_image(client)
            for backend in opts.backends:
                try:
                    run_backend(backend, opts, image, token, emit)
                except Exception:
                    say(f"{backend}: the benchmark failed:\n{traceback.format_exc()}")
                    errors.append(backend)
        except (KeyboardInterrupt, Interrupted) as exc:
            say(f"interrupted ({type(exc).__name__} {exc})")
            failed = True
        finally:
            try:
                leftovers = docker_retry(
                    "final cleanup", lambda: cleanup_session_containers(client, SESSION_ID))
                if leftovers:
                    say(f"removed {len(leftovers)} leftover container(s) of this run")
            except Exception as exc:
                say(f"final cleanup failed ({exc!r}): remove containers labelled "
                    f"discovery-test.session={SESSION_ID} by hand")
                failed = True
            client.close()
            if out is not None:
                out.close()
            keep_or_remove(work, args.keep_logs or failed or bool(errors))
    say(f"total {time.monotonic() - t_start:.0f}s")
    if rows:
        print(table(rows), flush=True)
    if failed:
        return 130
    if errors:
        say(f"no complete figures for: {', '.join(errors)}")
        return 2
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
