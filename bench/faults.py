#!/usr/bin/env python3
"""The fault matrix (issue 10 §3) under steady load, on a 3-member etcd cluster and a 3-member
ZooKeeper ensemble.

Per backend (``--backends``, one after the other), on loopback: the cluster
(``tests/harness/servers.py``), one ``discovery agent`` (``--ttl``, 5 s by default) and one
``discovery watch`` (its own HAProxy, one service ``ft-<random>``), each reaching every member
through its own ``TcpProxy`` (so a link can be cut, stalled or slowed), ``--instances`` (4)
example-app containers the agent checks itself (``tcp``, every 250 ms), and ``--clients`` (4)
client threads sending ``GET /`` through HAProxy, a new connection per request, ``--pause``
between requests (bounded by ``--max-requests`` and the run's time limit). A poller in the bench
reads the registry directly (not through the proxies) every 100 ms.

Then each fault of ``--faults``, one after the other, only once everything is registered and
served again. For each: the requests that failed of those sent (connection error, timeout after
``--request-timeout``, or a status other than 200) from the injection until the end of its
window; **serving again** (first answered request after the last failed one, from the
injection); **registry complete** (the first registry read holding every expected instance,
from the heal: the link back, the server restarted); **routed** (every expected instance has
answered through HAProxy, from the heal); and, after waiting ``--ttl`` + 1 s past the heal (so
that a lease or session that was not taken over has expired), the instances **lost** (expected
but not in the registry) and **stale** (in the registry, not expected).

Output: one JSON object per fault on stdout, then a table; raw results in
``bench/results/faults-<backend>.json`` (with ``--faults``, its rows are merged into the file
by fault name: the other faults' rows stay). Exit 0 when every target is met, 1 when one is missed,
2 when something could not be measured, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import docker.errors  # noqa: E402  (binds ``docker`` too)
from common import (  # noqa: E402
    RESULTS,
    Interrupted,
    Report,
    Unmeasured,
    install_signal_handlers,
    keep_or_remove,
    say,
)
from faults_list import DOCKERD_FAULTS, FAULTS, Spec  # noqa: E402
from faults_rig import Rig, now, sleep_until  # noqa: E402
from procs import HostLoad  # noqa: E402
from routing_rig import other_containers  # noqa: E402

from discovery.errors import DiscoveryError  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    SESSION_ID,
    TEST_LABEL,
    build_example_image,
    cleanup_session_containers,
)

# --------------------------------------------------------------------------- measuring


def measure(rig: Rig, name: str, spec: Spec, report: Report, before_note: str = ""
            ) -> dict[str, Any]:
    """Inject ``name``, wait for the recovery, emit its row (``before_note``: what had to be
    done to make the rig steady first)."""
    args = rig.args
    before = rig.expected_ids()
    host = HostLoad().start()
    cpu0 = os.times()
    others = other_containers(rig.client)
    say(f"{rig.backend}: {name}: {spec.what}")
    fault = spec.run(rig)
    expected, names = rig.expected_ids(), list(rig.expected)
    heal = fault.t_heal
    give_up = heal + args.recovery_timeout
    routed: list[float] = []

    def watch_routed() -> None:
        while now() < give_up and not routed:
            if rig.load.served_since(names, heal):
                routed.append(now())
            time.sleep(0.02)

    threading.Thread(target=watch_routed, daemon=True, name="routed").start()
    # a lease or session that was not taken over expires TTL after the fault: wait past it,
    # then until the registry has been complete, everything served and nothing failed for 1 s
    sleep_until(max(heal + args.settle, fault.t_inject + args.ttl + 1.5))
    while now() < give_up:
        t = now()
        if (rig.poller.complete_throughout(t - 1.0, expected) and routed
                and rig.load.window(t - 1.0, t)["failed"] == 0):
            break
        time.sleep(0.1)
    t_end = now()
    window = rig.load.window(fault.t_inject, t_end)
    polled = [(t, ids) for t, ids in rig.poller.since(fault.t_inject) if t <= t_end]
    kept = before & expected  # what was registered before and should still be
    missing = [len(kept - ids) for _, ids in polled if ids is not None]
    unreadable = [t for t, ids in polled if ids is None]
    final = next((ids for _, ids in reversed(polled) if ids is not None), None)
    # registry complete: from the heal until the first read of the streak of complete reads
    # that lasts to the end of the window (a later loss counts, not the first good read)
    reg_at: float | None = None
    for t, ids in polled:
        if ids is not None and expected <= ids:
            reg_at = reg_at if reg_at is not None else t
        else:
            reg_at = None
    reg_s = None if reg_at is None else round(max(reg_at - heal, 0.0), 2)
    lost = None if final is None else sorted(expected - final)
    stale = None if final is None else sorted(final - expected)
    ok = (lost == [] and reg_s is not None and bool(routed)
          and (spec.max_failed is None or window["failed"] <= spec.max_failed)
          and (spec.registry_back_within is None or reg_s <= spec.registry_back_within))
    target = "nothing lost" if spec.max_failed is None else "0 failed, nothing lost"
    if spec.registry_back_within is not None:
        target += f", registry complete <= {spec.registry_back_within:g} s after the heal"
    cpu1 = os.times()
    row = report.emit({
        "fault": name, "what": spec.what, "backend": rig.backend,
        "failed": window["failed"], "requests": window["requests"],
        "serving_again_s": window["serving_again_s"],
        "registry_complete_s": reg_s,
        "routed_all_s": round(max(routed[0] - heal, 0.0), 2) if routed else None,
        "lost": None if lost is None else len(lost), "stale": None if stale is None else len(stale),
        "missing_peak": max(missing, default=None),
        "registry_unreadable_s": (round(unreadable[-1] - unreadable[0] + 0.1, 1)
                                  if unreadable else 0.0),
        "heal_after_s": round(heal - fault.t_inject, 2),
        "window_s": round(t_end - fault.t_inject, 1),
        "p50_ms": window["p50_ms"], "p99_ms": window["p99_ms"], "max_ms": window["max_ms"],
        "failed_from_s": window["failed_from_s"], "failed_until_s": window["failed_until_s"],
        "failure_kinds": window["failure_kinds"], "instances": len(expected),
        "haproxy_master_at_end": rig.watcher.haproxy_master_pid(),
        "bench_cpu_pct_of_one_core": round(100 * (cpu1.user + cpu1.system - cpu0.user
                                                  - cpu0.system) / max(t_end - fault.t_inject,
                                                                       1e-9), 1),
        "other_containers": others, **host.read(), **fault.notes,
        **({"before": before_note} if before_note else {}), "target": target, "pass": ok})
    rig.samples[name] = {
        "failure_times_s": window["failure_times_s"],
        "registry_missing": [(round(t - fault.t_inject, 2),
                              None if ids is None else len(kept - ids)) for t, ids in polled],
        "lost_ids": lost, "stale_ids": stale}
    if fault.after is not None:
        fault.after()
    return row


def run_backend(args: argparse.Namespace, backend: str, names: list[str], work: Path,
                client: docker.DockerClient, image: str, report: Report) -> int:
    """Every fault of ``names`` on ``backend``; 2 when something could not be measured."""
    mark = report.mark()
    rig = Rig(args=args, backend=backend, work=work, client=client, image=image)
    code = 0
    deadline = now() + args.max_minutes * 60
    try:
        rig.up()
        for name in names:
            if now() > deadline:
                code = report.not_measured(f"{backend} {name}", "--max-minutes reached")
                continue
            try:
                before = ""
                try:
                    rig.steady()
                except Unmeasured:
                    before = rig.unstick()
                measure(rig, name, FAULTS[name], report, before)
            except (Unmeasured, DiscoveryError, docker.errors.DockerException, OSError,
                    RuntimeError) as exc:
                code = report.not_measured(f"{backend} {name}", exc)
    except (Unmeasured, DiscoveryError, docker.errors.DockerException, OSError,
            RuntimeError) as exc:
        code = report.not_measured(backend, exc)
    finally:
        load = getattr(rig, "load", None)
        total = len(load.times) if load is not None else 0
        rig.close()
    if len(report.rows) > mark[0]:
        path = RESULTS / f"faults-{backend}.json"
        previous = (json.loads(path.read_text())
                    if args.faults and path.exists() else None)  # a subset: merged into it
        report.save("faults", backend, mark, {
            "faults": rig.samples, "total_requests": total,
            "setup": {"members": 3, "instances": args.instances, "clients": args.clients,
                      "pause_s": args.pause, "ttl_s": args.ttl,
                      "request_timeout_s": args.request_timeout},
            "not_measured": [u for u in report.unmeasured if u.startswith(backend)]})
        if previous is not None:
            merge_into(path, previous, names)
    return code


def merge_into(path: Path, previous: dict[str, Any], names: Sequence[str]) -> None:
    """A run of some faults (``--faults``) must not drop the others from the saved result:
    its rows replace those of the same fault in ``previous`` (the file as it was), the rest
    stay as measured. The file keeps the earlier run's command and machine; each new row
    says which run measured it (``run``), and ``later_runs`` lists those runs."""
    doc = json.loads(path.read_text())
    run = {"command": doc["command"], "started_utc": doc["started_utc"],
           "finished_utc": doc["finished_utc"], "commit": doc["machine"].get("commit"),
           "loadavg_at_start": doc["machine"].get("loadavg_at_start"), "faults": list(names)}
    new_rows = {r["fault"]: {**r, "run": run} for r in doc["summary"]["rows"]}
    rows = [new_rows.pop(r["fault"], r) for r in previous["summary"]["rows"]]
    rows += new_rows.values()  # faults the earlier run did not have, in this run's order
    rows.sort(key=lambda r: list(FAULTS).index(r["fault"]) if r["fault"] in FAULTS else 99)
    old, new = previous["samples"], doc["samples"]
    merged = {**previous, "summary": {**previous["summary"], "rows": rows},
              "later_runs": [*previous.get("later_runs", []), run],
              "samples": {**old, "faults": {**old.get("faults", {}), **new["faults"]},
                          "total_requests": old.get("total_requests", 0)
                          + new["total_requests"],
                          "not_measured": [
                              u for u in old.get("not_measured", [])
                              if not any(f" {n}:" in u for n in names)]
                          + new["not_measured"]}}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True, allow_nan=False) + "\n")
    say(f"merged into {path.name}: {len(rows)} rows")


def table(report: Report) -> str:
    head = (f"{'backend':<7} {'fault':<29} {'failed/total':>14} {'serving':>8} "
            f"{'registry':>9} {'routed':>7} {'lost':>5} {'stale':>5}  pass")
    lines = ["", head, "-" * len(head)]
    for r in report.rows:
        def s(v: Any) -> str:
            return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        lines.append(f"{r['backend']:<7} {r['fault']:<29} "
                     f"{r['failed']:>6}/{r['requests']:<7} {s(r['serving_again_s']):>8} "
                     f"{s(r['registry_complete_s']):>9} {s(r['routed_all_s']):>7} "
                     f"{s(r['lost']):>5} {s(r['stale']):>5}  {r['pass']}")
    lines.append("serving: s from the fault to the first answer after the last failure; registry, "
                 "routed: s from the heal until complete")
    for what in report.unmeasured:
        lines.append(f"NOT MEASURED: {what}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="etcd,zk", help="comma-separated (default etcd,zk)")
    ap.add_argument("--faults", default="",
                    help=f"comma-separated, in this order by default: {', '.join(FAULTS)} "
                         "(each where its backend applies; the dockerd ones only with "
                         "--include-dockerd)")
    ap.add_argument("--include-dockerd", action="store_true",
                    help="also restart dockerd (without, then with live-restore): it disrupts "
                         "every other container on this host. Off by default")
    ap.add_argument("--instances", type=int, default=4, help="containers serving (default 4)")
    ap.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--pause", type=float, default=0.01,
                    help="each client's pause between requests, s (default 0.01)")
    ap.add_argument("--request-timeout", type=float, default=2.0,
                    help="a request not answered within this is failed (default 2 s)")
    ap.add_argument("--max-requests", type=int, default=2_000_000)
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="per backend: faults not begun by then are not measured (default 15)")
    ap.add_argument("--ttl", type=float, default=5.0, help="the agent's --ttl (default 5 s)")
    ap.add_argument("--grace", type=float, default=2.0,
                    help="an app answers this long after SIGTERM (default 2 s)")
    ap.add_argument("--leader-down", type=float, default=6.0)
    ap.add_argument("--outage", type=float, default=15.0, help="whole cluster down, s")
    ap.add_argument("--stall", type=float, default=20.0,
                    help="member-stall, leader-stall: how long the member is stopped (SIGSTOP), "
                         "s (default 20: longer than gRPC's keepalive, 10 s + 5 s)")
    ap.add_argument("--agent-down", type=float, default=1.0)
    ap.add_argument("--latency-ms", type=float, default=200.0,
                    help="added to every registry round trip (default 200)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--upgrade-signal", default="USR2",
                    help="how watcher-upgrade stops the old watcher: USR2 (default) exits "
                         "leaving HAProxy to the next watcher; TERM stops HAProxy too")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="after recovery, wait this long (and past TTL + 1.5 s from the fault) "
                         "before counting what is lost")
    ap.add_argument("--recovery-timeout", type=float, default=60.0)
    ap.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args(argv)
    for v, lo, hi, what in ((args.instances, 1, 16, "--instances"),
                            (args.clients, 1, 16, "--clients"),
                            (args.max_minutes, 1, 60, "--max-minutes"),
                            (args.ttl, 1, 10, "--ttl (the ZooKeeper harness allows 1..10 s)")):
        if not lo <= v <= hi:
            ap.error(f"{what} must be in {lo}..{hi}")
    if args.pause < 0.001:
        ap.error("--pause must be at least 0.001 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(backends) - {"etcd", "zk"}:
        raise SystemExit(f"unknown backend(s): {sorted(set(backends) - {'etcd', 'zk'})}")
    wanted = [f.strip() for f in args.faults.split(",") if f.strip()] or list(FAULTS)
    if set(wanted) - set(FAULTS):
        raise SystemExit(f"unknown fault(s): {sorted(set(wanted) - set(FAULTS))}")
    if not args.include_dockerd:
        wanted = [f for f in wanted if f not in DOCKERD_FAULTS]
    install_signal_handlers()
    # the bench's own registry reader: its reconnects are in the row, not on the terminal
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    logging.getLogger("discovery").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="discovery-faults-"))
    report = Report(args.json_out)
    code = 0
    client: docker.DockerClient | None = None
    say(f"work dir {work}; session label {TEST_LABEL}={SESSION_ID}")
    try:
        client = docker.from_env(timeout=60)
        image = build_example_image(client)
        for backend in backends:
            names = [f for f in wanted if backend in FAULTS[f].backends]
            code = max(code, run_backend(args, backend, names, work, client, image, report))
    except Interrupted:
        say("interrupted: cleaning up")
        return 130
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                cleanup_session_containers(client)
            client.close()
        print(table(report), flush=True)
        keep_or_remove(work, args.keep_logs or code == 2)
    return report.status(code)


if __name__ == "__main__":
    sys.exit(main())
