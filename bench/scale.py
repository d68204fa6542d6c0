#!/usr/bin/env python3
"""Scale benchmark of ``discovery watch``: 1,000 services x 10 instances.

Simulated agents (``--instances`` nodes ``sim0..``, each with its own etcd lease, like one
agent per host) write every instance straight into a private single-node etcd, in
transactions of 100 puts, under a fresh prefix. Instance *j* of every service points at
one of ``--instances`` busybox ``httpd`` processes on 127.0.0.1 (each answers its own
name). Then ``discovery watch --config scale.toml`` routes all services, one HAProxy
listener each on free ports below the ephemeral range, and the bench measures:

* **first valid config**: from the watcher's exec to HAProxy answering 200 on three
  listeners (the first, middle and last service); the watcher's log splits it. The watcher
  is started ``--starts`` times (3), each time a new one on a new state dir after the
  previous one and its HAProxy stopped; the median is reported, each start in the result.
* **apply one change**: on a probe service whose 10 instances are ``draining`` (so every
  request that reaches a ready server reaches the new one), the bench puts one more
  instance (pointing at a ``probe`` httpd) and polls that service's listener until the
  answer is ``probe``: write → served. Then deregisters it as the agent does (``draining``,
  then the delete): deregistration → 503. ``--changes`` times
  each, after one warm-up (reported separately: the first change after start).
* **bulk change**: after the single changes, one simulated host's lease is revoked, so its
  instance of every service (1,000 at once) vanishes as when a host's lease expires; timed
  from the revoke until HAProxy (``show servers state`` on the admin socket) has none of them
  in service. Target: <= 250 ms, no reload.
* **RSS** of the watcher (VmRSS at the end and VmHWM, the peak) and of its HAProxy.

The same is done for ``--small-services`` x 10 (``10,100``: several sizes), to show whether
the apply time depends on the size, and each size with the default quiescence window
(``wait = 20ms:500ms``) and with ``wait = 0ms:500ms`` (the change alone, without the
deliberate 20 ms coalescing pause).
``--router baseline`` measures the same with ``bench/reload_per_change.py`` instead of the
watcher (a full render, ``haproxy -c`` and a reload per change), for comparison.
``--py-spy`` samples the watcher (startup and changes, separately) and prints where the time
goes. Output as ``bench/routing.py``: JSON lines, then a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    Interrupted,
    Report,
    Unmeasured,
    default_wait,
    install_signal_handlers,
    keep_or_remove,
    say,
    summary,
)
from procs import HOST, HostLoad, Routed, children_of, http_get, rss_kib, wait_until  # noqa: E402
from scale_rig import (  # noqa: E402
    PORT_RANGE,
    Httpds,
    Profiler,
    SimAgents,
    bulk_change,
    haproxy_check_ms,
    log_times,
    sim_instance,
)

from discovery.model import State  # noqa: E402
from tests.harness.servers import EtcdCluster  # noqa: E402
from tests.harness.util import server_ports  # noqa: E402

TARGET_FIRST_CONFIG_MS = 2000.0
TARGET_APPLY_P99_MS = 50.0
TARGET_RSS_BYTES = 150e6
TARGET_BULK_MS = 250.0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("scale")
    g.add_argument("--services", type=int, default=1000, help="scale: services (default 1000)")
    g.add_argument("--instances", type=int, default=10, help="scale: instances per service")
    g.add_argument("--small-services", default="10,100",
                   help="scale: the smaller sizes to compare with, comma-separated (0: none)")
    g.add_argument("--router", choices=("watcher", "baseline"), default="watcher",
                   help="scale: discovery watch, or bench/reload_per_change.py (a reload per "
                        "change; result scale-baseline-etcd.json)")
    g.add_argument("--changes", type=int, default=20, help="scale: measured changes per run")
    g.add_argument("--waits", default="default,0ms:500ms",
                   help="scale: quiescence windows to run ('default': the watcher's, 20ms:500ms)")
    g.add_argument("--starts", type=int, default=3,
                   help="scale: starts of the router per run, the first valid config of each "
                        "timed (median reported; this machine's start times vary by ~1 s)")
    g.add_argument("--no-bulk", dest="bulk", action="store_false",
                   help="scale: skip the bulk change (one simulated host's lease revoked)")
    g.add_argument("--py-spy", metavar="BIN", default=None,
                   help="scale: sample the watcher with this py-spy (profiling run)")


# --------------------------------------------------------------------------- one run


@dataclass
class Setup:
    etcd: EtcdCluster
    httpds: Httpds
    work: Path
    report: Report
    args: argparse.Namespace
    run_no: int = 0


def measure(setup: Setup, services: int, wait: str) -> dict[str, Any]:
    args, report = setup.args, setup.report
    setup.run_no += 1
    label = f"{services}x{args.instances}"
    prefix = f"/bench-scale-{setup.run_no}-{services}"
    names = [f"svc{n:04d}" for n in range(services)]
    probe_service = names[len(names) // 2 + (1 if len(names) > 2 else 0)]
    check_services = [names[0], names[len(names) // 2], names[-1]]
    if probe_service in check_services:
        check_services = [n for n in check_services if n != probe_service] or [names[0]]
    ports = server_ports(services, HOST, PORT_RANGE)
    backend_ports = [setup.httpds.ports[f"b{j}"] for j in range(args.instances)]
    probe_port = setup.httpds.ports["probe"]

    agents = SimAgents(setup.etcd.client_ports[0], prefix, args.instances)
    load = HostLoad().start()
    profilers: list[Profiler] = []
    watcher: Routed | None = None
    try:
        t = time.monotonic()
        serial = 0
        for node in range(args.instances):
            batch = []
            for name in names:
                serial += 1
                state = State.DRAINING if name == probe_service else State.UP
                batch.append(sim_instance(name, node, backend_ports[node], serial=serial,
                                          state=state))
            agents.put_many(node, batch)
        say(f"scale {label}: {services * args.instances} instances written by "
            f"{args.instances} simulated agents in {time.monotonic() - t:.1f}s")

        toml = setup.work / f"scale-{setup.run_no}.toml"
        lines = ["[watcher]"]
        if wait != "default":
            lines.append(f'wait = "{wait}"')
        for name, port in zip(names, ports, strict=True):
            lines += [f"[services.{name}]", f"port = {port}"]
        toml.write_text("\n".join(lines) + "\n")
        url = f"etcd://{HOST}:{setup.etcd.client_ports[0]}{prefix}"
        check_ports = [ports[names.index(n)] for n in check_services]

        def start_router(profile: bool) -> tuple[Routed, float, dict[str, int]]:
            """A new router (nothing runs on its state dir); the ms from its exec until
            HAProxy answers on the check ports, and its log's milestones (ms after exec)."""
            if args.router == "baseline":
                routed = Routed.baseline(url, dict(zip(names, ports, strict=True)), setup.work)
            else:
                routed = Routed.watcher(url, {}, setup.work, config=toml)
            wall0 = time.time()
            routed.start()
            if profile:
                profilers.append(Profiler(args.py_spy, routed.pid, idle=True, out=setup.work
                                          / f"pyspy-{label}-{setup.run_no}-start.txt"))
            pending = set(check_ports)
            deadline = time.monotonic() + 120
            while pending:
                if not routed.alive:
                    raise Unmeasured(f"watcher exited:\n{routed.log_tail()}")
                if time.monotonic() > deadline:
                    raise Unmeasured(f"scale {label}: no valid config within 120 s")
                for p in list(pending):
                    with contextlib.suppress(OSError):
                        if http_get(p, timeout=1.0)[0] == 200:
                            pending.discard(p)
                time.sleep(0.005)
            took = (time.monotonic() - routed.started_at) * 1000

            def logged() -> dict[str, float] | None:
                marks = log_times(routed.log_text())
                return marks if "haproxy_started" in marks else None

            marks = wait_until(logged, 10, "the router logged its HAProxy's start")
            return routed, took, {k: round((v - wall0) * 1000)
                                  for k, v in sorted(marks.items(), key=lambda x: x[1])}

        starts: list[tuple[float, dict[str, int]]] = []
        for n in range(args.starts):  # the profiled start (if any) is the last one
            if watcher is not None:
                watcher.close()
            watcher, took, split = start_router(bool(args.py_spy) and n == args.starts - 1)
            starts.append((took, split))
        first_valid_ms, split = sorted(starts, key=lambda s: s[0])[(len(starts) - 1) // 2]
        assert watcher is not None  # --starts >= 1

        probe_listen = ports[names.index(probe_service)]

        def served(body: str, status: int = 200) -> bool:
            try:
                got = http_get(probe_listen, timeout=1.0)
            except OSError:
                return False
            return got[0] == status and (status != 200 or got[1] == body)

        def one_change(k: int) -> tuple[float, float]:
            inst = sim_instance(probe_service, 0, probe_port, serial=10**9 + k)
            t0 = time.monotonic()
            agents.put(0, inst)
            wait_until(lambda: served("probe"), 60, f"change {k} served", interval=0.0005)
            add_ms = (time.monotonic() - t0) * 1000
            time.sleep(0.1)
            t1 = time.monotonic()
            agents.leave(0, inst)
            wait_until(lambda: served("", 503), 60, f"removal {k} applied", interval=0.0005)
            remove_ms = (time.monotonic() - t1) * 1000
            time.sleep(0.1)
            return add_ms, remove_ms

        wait_until(lambda: served("", 503), 30, "the probe service answers 503 (all draining)")
        first_change_ms, _ = one_change(0)
        ready_ms = (time.monotonic() - watcher.started_at) * 1000
        if profilers:
            profilers[-1].stop()
            profilers.append(Profiler(args.py_spy or "py-spy", watcher.pid, idle=False,
                                      out=setup.work / f"pyspy-{label}-{setup.run_no}-changes.txt"))
        adds: list[float] = []
        removes: list[float] = []
        for k in range(1, args.changes + 1):
            a, r = one_change(k)
            adds.append(a)
            removes.append(r)
        for prof in profilers:
            prof.stop()
        bulk: dict[str, Any] | None = None
        if args.bulk:
            node = args.instances - 1
            reloads_before = watcher.reload_count()
            bulk = bulk_change(agents, node, watcher.state_dir / "admin.sock",
                               backend_ports[node])
            bulk["haproxy_reloads"] = (watcher.reload_count() or 0) - (reloads_before or 0)
            say(f"scale {label}: bulk change ({bulk['servers_before']} servers of sim{node}) "
                f"applied in {bulk['applied_ms']:.0f} ms, {bulk['haproxy_reloads']} reloads")
        check_ms, cfg_lines = haproxy_check_ms(watcher.state_dir / "haproxy.cfg")
        mem = rss_kib(watcher.pid)
        hap_kib = 0
        master = watcher.haproxy_master_pid()
        if master is not None:
            hap_kib = rss_kib(master).get("VmRSS", 0) + sum(
                rss_kib(c).get("VmRSS", 0) for c in children_of(master))
        reloads = watcher.reload_count()
        profiled = bool(args.py_spy)
        common: dict[str, Any] = {"size": label, "services": services,
                                  "instances": services * args.instances,
                                  "wait": default_wait() if wait == "default" else wait,
                                  "profiled": profiled, **load.read()}
        target_first = TARGET_FIRST_CONFIG_MS
        report.emit({"name": "scale_first_valid_config", "backend": "etcd", "n": len(starts),
                     "p50_ms": round(first_valid_ms),
                     "p99_ms": round(max(took for took, _ in starts)),
                     "value": round(first_valid_ms), "unit": "ms",
                     "starts_ms": [round(took) for took, _ in starts],
                     "target": f"<= {target_first:g} ms",
                     "pass": (first_valid_ms <= target_first) if services >= 1000 else None,
                     "split_ms_after_exec": split, "ready_for_changes_ms": round(ready_ms),
                     "haproxy_c_ms": check_ms, "config_lines": cfg_lines,
                     "first_change_after_start_ms": round(first_change_ms), **common})
        for name, values in (("scale_apply_add", adds), ("scale_apply_remove", removes)):
            report.latency(name, "etcd", values, expected=args.changes,
                           target_ms=TARGET_APPLY_P99_MS, haproxy_reloads=reloads, **common)
        rss_b = mem.get("VmRSS", 0) * 1024
        hwm_b = mem.get("VmHWM", 0) * 1024
        report.emit({"name": "scale_watcher_rss", "backend": "etcd", "n": 1,
                     "p50_ms": None, "p99_ms": None,
                     "value": round(rss_b / 1e6, 1), "unit": "MB",
                     "rss_mib": round(rss_b / 2**20, 1), "hwm_mb": round(hwm_b / 1e6, 1),
                     "rss_anon_mib": round(mem.get("RssAnon", 0) / 1024, 1),
                     "haproxy_rss_mib": round(hap_kib / 1024, 1),
                     "target": f"peak (VmHWM) <= {TARGET_RSS_BYTES / 1e6:g} MB",
                     "pass": (hwm_b <= TARGET_RSS_BYTES) if services >= 1000 else None,
                     **common})
        if bulk is not None:
            report.emit({"name": "scale_bulk_change", "backend": "etcd", "n": 1,
                         "p50_ms": bulk["applied_ms"], "p99_ms": bulk["applied_ms"],
                         "value": bulk["applied_ms"], "unit": "ms",
                         "target": f"<= {TARGET_BULK_MS:g} ms, no reload",
                         "pass": (bulk["applied_ms"] <= TARGET_BULK_MS
                                  and bulk["haproxy_reloads"] == 0)
                         if services >= 1000 else None, **bulk, **common})
        samples = {"first_valid_ms": round(first_valid_ms, 1),
                   "starts_ms": [round(took, 1) for took, _ in starts],
                   "first_change_after_start_ms": round(first_change_ms, 1),
                   "add_ms": [round(v, 2) for v in adds],
                   "remove_ms": [round(v, 2) for v in removes], "bulk": bulk}
        for prof in profilers:
            top = prof.top()
            phase = "startup" if prof.out.name.endswith("-start.txt") else "changes"
            report.emit({"name": "scale_profile", "backend": "etcd", "n": top["samples"],
                         "p50_ms": None, "p99_ms": None, "target": None, "pass": None,
                         "phase": phase, "file": str(prof.out), **top, **common})
            say(f"py-spy {phase} ({prof.out.name}): {top['samples']} samples")
            for kind in ("inclusive", "self"):
                for f, pct in top[kind]:
                    say(f"   {kind:<9} {pct:5.1f}%  {f}")
    finally:
        for prof in profilers:
            prof.stop()
        if watcher is not None:
            watcher.close()
        agents.close()
    return samples


def run_scale(args: argparse.Namespace, work: Path, report: Report) -> None:
    if not 1 <= args.services <= 2000 or not 1 <= args.instances <= 50:
        raise Unmeasured("--services must be in 1..2000 and --instances in 1..50")
    if not 1 <= args.changes <= 200:
        raise Unmeasured("--changes must be in 1..200")
    if not 1 <= args.starts <= 20:
        raise Unmeasured("--starts must be in 1..20")
    small = [int(x) for x in str(args.small_services).split(",") if x.strip() and int(x)]
    sizes = [args.services, *small]
    waits = [w.strip() for w in args.waits.split(",") if w.strip()]
    if args.router == "baseline":
        waits = ["none"]  # the baseline applies each change as it comes (no window)
    etcd = EtcdCluster(1, work / "scale-etcd")
    httpds = Httpds(work)
    try:
        etcd.start()
        for j in range(args.instances):
            httpds.start(f"b{j}")
        httpds.start("probe")
        setup = Setup(etcd, httpds, work, report, args)
        mark = report.mark()
        samples: dict[str, Any] = {}
        for size in sizes:
            for wait in waits:
                say(f"scale: {size} services x {args.instances}, wait {wait}")
                samples[f"{size}x{args.instances} {wait}"] = measure(setup, size, wait)
        report.save("scale" if args.router == "watcher" else "scale-baseline", "etcd", mark,
                    samples)
    finally:
        httpds.close()
        etcd.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="discovery-scale-"))
    report = Report(args.json_out)
    code = 0
    try:
        run_scale(args, work, report)
    except Interrupted:
        say("interrupted: cleaning up")
        return 130
    except Unmeasured as exc:
        code = report.not_measured("scale", exc)
    finally:
        print(summary(report), flush=True)
        keep_or_remove(work, args.keep_logs or args.py_spy or code == 2)
    return report.status(code)


if __name__ == "__main__":
    sys.exit(main())
