#!/usr/bin/env python3
"""DNS benchmark: dnsperf against discovery's DNS endpoint and dnsmasq, same records, one run.

Both servers answer the same synthetic zone: ``--services`` services of ``--instances``
instances each (one node per instance, so every SRV target is ``<node>.node.discovery.``).
Ours runs in its own process (``bench/dns.py --serve``: a Catalog filled with Instance objects,
a ``DnsServer`` on a free 127.0.0.1 port); dnsmasq gets the same names from an addn-hosts file
and ``--srv-host`` options (``--no-resolv --no-hosts --keep-in-foreground``). For each query
type (``--qtypes``, default A then SRV) and each of ``--rounds`` rounds, ours then dnsmasq run
``dnsperf -c CLIENTS -l DURATION`` over a query file naming every service, one at a time
(alternating, so that a busy neighbour on the host hurts both alike). Before and after each
run a sample of names is asked with ``dig`` and checked against the records.

Output: one JSON line per run on stdout, then a summary (median qps of the rounds). With
``--write-docs`` the summary and the exact command replace the ``## DNS`` section of
docs/dns.md. Exit 0 when ours reached ``--target`` (0.5) x dnsmasq's qps for A with 0 lost and
every answer correct, 1 otherwise, 2 when something could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import machine, say, started, write_result  # noqa: E402
from dns_servers import churn_dnsmasq, cpu_seconds, serve, start_dnsmasq, start_ours, stop  # noqa: E402
from dns_zone import (  # noqa: E402
    CHURN_SERVICE,
    COREDNS_REFERENCE_QPS,
    WORKLOADS,
    check,
    qname,
    query_names,
    zone,
    zone_size,
)

from discovery.model import Instance  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

DOCS = ROOT / "docs" / "dns.md"
TOOLS = {"dnsperf": "dnsperf", "dnsmasq": "dnsmasq-base", "dig": "dnsutils"}


def dnsperf(args: argparse.Namespace, port: int, queries: Path) -> dict[str, object]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
           "-c", str(args.clients), "-l", str(args.duration)]
    if args.max_qps:
        cmd += ["-Q", str(args.max_qps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    text = out.stdout + out.stderr

    def num(label: str) -> float:
        found = re.search(rf"{label}:\s+([0-9.]+)", text)
        if not found:
            raise RuntimeError(f"dnsperf output without {label!r}:\n{text}")
        return float(found.group(1))

    codes = dict(re.findall(r"([A-Z]+) (\d+) \(", text.split("Response codes:")[1].split("\n")[0]))
    return {"sent": int(num("Queries sent")), "completed": int(num("Queries completed")),
            "lost": int(num("Queries lost")), "qps": round(num("Queries per second")),
            "avg_latency_ms": round(num("Average Latency \\(s\\)") * 1000, 3),
            "rcodes": {k: int(v) for k, v in codes.items()}, "cmd": shlex.join(cmd)}


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for workload in args.workloads:
        n_services = zone_size(args, workload)
        records = zone(n_services, args.instances)
        names = query_names(workload, args.services, args.distinct)
        nx = workload == "nx"
        checkable = [n for n in names if not (workload == "churn" and n == CHURN_SERVICE)]
        sample = checkable[:: max(1, len(checkable) // args.check)][: args.check]
        per_s = args.changes_per_s if workload == "churn" else 0
        for qtype in args.qtypes:
            queries = work / f"queries-{workload}-{qtype}.txt"
            queries.write_text("".join(f"{qname(s, qtype)} {qtype}\n" for s in names))
            for rnd in range(1, args.rounds + 1):
                for server in ("discovery", "dnsmasq"):
                    rows.append(one_run(args, work, server, workload, qtype, rnd, records,
                                        queries, sample, nx=nx, per_s=per_s,
                                        services=n_services))
    return rows


def one_run(args: argparse.Namespace, work: Path, server: str, workload: str, qtype: str,
            rnd: int, records: list[Instance], queries: Path, sample: list[str], *, nx: bool,
            per_s: int, services: int) -> dict[str, Any]:
    port = free_port()
    proc = (start_ours(args, port, work, services, per_s) if server == "discovery"
            else start_dnsmasq(args, port, work, records))
    spy = None
    stop_churn = threading.Event()
    churner: threading.Thread | None = None
    try:
        bad, extra = check(port, records, qtype, sample, nx=nx)
        if per_s and server == "dnsmasq":
            churner = threading.Thread(target=churn_dnsmasq, daemon=True,
                                       args=(proc, work / "hosts", per_s, stop_churn))
            churner.start()
        if args.py_spy and server == "discovery":
            spy = subprocess.Popen([args.py_spy, "record", "-p", str(proc.pid), "-f",
                                    "speedscope", "-o", str(work / f"py-spy-{qtype}-{rnd}.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        perf = dnsperf(args, port, queries)
        cpu1, wall = cpu_seconds(proc.pid), time.monotonic() - t0
        stop_churn.set()
        if churner is not None:
            churner.join(5)
        b2, e2 = check(port, records, qtype, sample, nx=nx)
        bad, extra = bad + b2, extra + e2
    finally:
        stop_churn.set()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        stop(proc)
    rcodes = perf["rcodes"]
    assert isinstance(rcodes, dict)
    correct = not bad and set(rcodes) == ({"NXDOMAIN"} if nx else {"NOERROR"})
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    done = max(1, int(perf["completed"]))  # type: ignore[call-overload]
    row = {"server": server, "workload": workload, "qtype": qtype, "round": rnd, **perf,
           "zone_services": services, "query_names": sum(1 for _ in queries.open()),
           "changes_per_s": per_s, "server_cpu_pct": round((user + system) / wall * 100),
           "server_us_per_query": {"user": round(user / done * 1e6, 2),
                                   "sys": round(system / done * 1e6, 2)},
           "checked_names": len(sample) * 2, "correct": correct,
           "additional_correct": not extra, "mismatches": bad[:5],
           "additional_mismatches": extra[:5]}
    print(json.dumps(row), flush=True)
    say(f"{workload} {qtype} round {rnd} {server}: {perf['qps']} qps, lost {perf['lost']}, "
        f"cpu {row['server_cpu_pct']}%, correct {correct}, additional {not extra}")
    return row


def summarize(args: argparse.Namespace,
              rows: list[dict[str, Any]]) -> tuple[str, bool, list[dict[str, Any]]]:
    lines = ["| workload | query | discovery qps (median) | dnsmasq qps (median) | ratio (worst "
             "round) | lost (discovery / dnsmasq) | answers correct | additional section "
             "correct (discovery / dnsmasq) | CPU µs/query user+sys (discovery / dnsmasq) |",
             "|---|---|---|---|---|---|---|---|---|"]
    ok = True
    table: list[dict[str, Any]] = []
    for workload in args.workloads:
        for qtype in args.qtypes:
            mine = [r for r in rows if r["qtype"] == qtype and r["workload"] == workload]

            def pick(server: str, key: str, sel: list[dict[str, Any]] = mine) -> list[int]:
                return [int(r[key]) for r in sel if r["server"] == server]

            ours_q, theirs_q = pick("discovery", "qps"), pick("dnsmasq", "qps")
            if not ours_q or not theirs_q:
                continue
            ours, theirs = statistics.median(ours_q), statistics.median(theirs_q)
            ratio = ours / theirs if theirs else 0.0
            pairs = [a / b for a, b in zip(ours_q, theirs_q, strict=True) if b]
            lost = (sum(pick("discovery", "lost")), sum(pick("dnsmasq", "lost")))
            correct = all(r["correct"] for r in mine)
            add = tuple(all(r["additional_correct"] for r in mine if r["server"] == srv)
                        for srv in ("discovery", "dnsmasq"))
            cpu = " / ".join(_cpu(mine, server) for server in ("discovery", "dnsmasq"))
            table.append({"workload": workload, "qtype": qtype, "discovery_qps": ours,
                          "dnsmasq_qps": theirs, "ratio": round(ratio, 2),
                          "worst_ratio": round(min(pairs, default=0), 2),
                          "discovery_rounds": ours_q, "dnsmasq_rounds": theirs_q,
                          "lost": list(lost), "correct": correct,
                          "additional_correct": list(add), "cpu_us_per_query": cpu,
                          "changes_per_s": mine[0]["changes_per_s"],
                          "query_names": mine[0]["query_names"]})
            yn = {True: "yes", False: "NO"}
            lines.append(
                f"| {workload} | {qtype} | {ours:.0f} ({', '.join(map(str, ours_q))}) | "
                f"{theirs:.0f} ({', '.join(map(str, theirs_q))}) | {ratio:.2f} "
                f"({min(pairs, default=0):.2f}) | {lost[0]} / {lost[1]} | {yn[correct]} | "
                f"{yn[add[0]]} / {yn[add[1]]} | {cpu} |")
            if qtype == "A" and workload == "hot":
                ok = ratio >= args.target and lost[0] == 0 and correct
    return "\n".join(lines), ok, table


def _cpu(rows: list[dict[str, Any]], server: str) -> str:
    mine = [r["server_us_per_query"] for r in rows if r["server"] == server]
    user = statistics.median(c["user"] for c in mine)
    system = statistics.median(c["sys"] for c in mine)
    return f"{user:.1f}+{system:.1f}"


def write_docs(args: argparse.Namespace, table: str, ok: bool, argv: Sequence[str]) -> None:
    cores = os.cpu_count()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    dnsmasq = subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True).stdout
    versions = f"dnsmasq {dnsmasq.split()[2]}, Python {sys.version.split()[0]}"
    perf = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
    perf_version = next((line for line in (perf.stdout + perf.stderr).splitlines()
                         if line.startswith("Version")), "")
    command = ".venv/bin/python bench/dns.py " + shlex.join(argv)
    perf_flags = f"dnsperf -c {args.clients} -l {args.duration}" + \
        (f" -Q {args.max_qps}" if args.max_qps else "")
    metrics = "; our server counts every query in a Prometheus counter" if args.metrics else ""
    section = f"""## DNS

<!-- written by bench/dns.py --write-docs on {time.strftime('%Y-%m-%d')}; do not edit by hand -->

```sh
{command.strip()}
```

{cores} cores ({cpu}), {versions}, dnsperf {perf_version.replace('Version ', '')};
load average {args.load_before} before the run, {args.load_after} after (a shared host: other
work ran alongside, which is why the rounds alternate). Zone: {args.services} services x
{args.instances} instances, one node each{metrics}. Per query type and round, ours then
dnsmasq, each in its own process on a free 127.0.0.1 port, under `{perf_flags}` (default 100
outstanding queries) over a file naming every service once; dnsperf and the server share the
{cores} cores. Every run is framed by `dig` checks of {min(args.check, args.services)} names
against the records, and all dnsperf answers must be NOERROR. Median of {args.rounds} rounds
(each round's figure in brackets); CPU is the server's own (`/proc/PID/stat`), per answered query.

{table}

Target (A): discovery >= {args.target:.0%} of dnsmasq's qps, 0 lost, answers correct:
**{'met' if ok else 'NOT met'}**.
"""
    text = DOCS.read_text() if DOCS.exists() else "# DNS\n"
    start = text.find("\n## DNS\n")
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:start + 1] + section + (text[end:] if end >= 0 else "")
    DOCS.write_text(text)
    say(f"wrote the ## DNS section of {DOCS}")


def _first_line(argv: list[str], prefix: str = "") -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return None
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(prefix)]
    return lines[0] if lines else None


def ensure_tools() -> bool:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return True
    packages = sorted({TOOLS[t] for t in missing})
    say(f"missing {', '.join(missing)}: apt-get install -y {' '.join(packages)}")
    if os.geteuid() != 0:
        say("not root: install them first (scripts/setup.sh with DISCOVERY_BENCH=1 does)")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", *packages], ["apt-get", "update"],
                ["apt-get", "install", "-y", *packages]):
        if subprocess.run(cmd, env=env, stdout=sys.stderr).returncode == 0:
            return all(shutil.which(tool) for tool in TOOLS)
    say(f"could not install {' '.join(packages)}")
    return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds of dnsperf per run")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--max-qps", type=int, default=0, help="dnsperf -Q (0: unlimited)")
    p.add_argument("--rounds", type=int, default=3, help="ours/dnsmasq pairs per query type")
    p.add_argument("--qtypes", type=lambda s: s.split(","), default=["A", "SRV"],
                   help="A and/or SRV, comma-separated")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS),
                   help="hot: --services names, static catalog (the cached path); distinct: "
                        "--distinct services, each name asked once per pass; nx: --distinct "
                        "names that do not exist; churn: hot while the catalog changes "
                        "--changes-per-s times a second")
    p.add_argument("--services", type=int, default=50)
    p.add_argument("--distinct", type=int, default=5000, help="names for distinct / nx")
    p.add_argument("--changes-per-s", type=int, default=100, help="catalog changes (churn)")
    p.add_argument("--instances", type=int, default=3, help="per service")
    p.add_argument("--udp-threads", type=int, default=1, help="our DnsServer(udp_threads=)")
    p.add_argument("--metrics", action="store_true",
                   help="our server counts every query in a Prometheus counter (on_query hook)")
    p.add_argument("--check", type=int, default=10, help="names checked with dig per run")
    p.add_argument("--target", type=float, default=0.5, help="ours / dnsmasq qps for A")
    p.add_argument("--py-spy", metavar="BIN", help="profile our server (speedscope in work dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, query files)")
    p.add_argument("--bench-name", default="dns",
                   help="the result's name: bench/results/<name>-none.json")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite ## DNS in {DOCS}")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not set(args.workloads) <= set(WORKLOADS) or not 1 <= args.distinct <= 20000 or \
            not 0 <= args.changes_per_s <= 1000:
        p.error(f"--workloads from {','.join(WORKLOADS)}; --distinct 1..20000; "
                "--changes-per-s 0..1000")
    if not set(args.qtypes) <= {"A", "SRV"} or not 1 <= args.services <= 10000 or \
            not 1 <= args.instances <= 50 or not 1 <= args.duration <= 600 or \
            not 1 <= args.rounds <= 20:
        p.error("--qtypes A,SRV; --services 1..10000; --instances 1..50; --duration 1..600; "
                "--rounds 1..20")
    return args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    if not ensure_tools():
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started_at, machine_info = started(), machine()
    machine_info["dnsmasq"] = _first_line(["dnsmasq", "--version"])
    machine_info["dnsperf"] = _first_line(["dnsperf", "-h"], "Version")
    try:
        with workdir(args.keep) as work:
            rows = run(args, work)
        args.load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        say(f"could not measure: {exc}")
        return 2
    table, ok, summary = summarize(args, rows)
    print(table)
    path = write_result(args.bench_name, "none", started_at=started_at,
                        machine_info=machine_info,
                        summary={"rows": summary, "target_met": ok,
                                 "coredns_reference_qps": COREDNS_REFERENCE_QPS},
                        samples=rows, argv=["bench/dns.py", *argv])
    say(f"raw result: {path}")
    if args.write_docs:
        write_docs(args, table, ok, [a for a in argv if a != "--write-docs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
