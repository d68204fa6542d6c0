#!/usr/bin/env python3
"""Write the tables of docs/benchmarks.md, the sizing of docs/operations.md and the README's
fleet summary from the raw results in bench/results/*.json.

    .venv/bin/python scripts/gen_benchmarks.py           # rewrite the generated tables
    .venv/bin/python scripts/gen_benchmarks.py --check   # exit 1 if one is out of date

Every table of a page sits between ``<!-- generated: NAME -->`` and ``<!-- end generated
-->``; this script rewrites what is between the markers and leaves the prose around them
alone (``docgen.render``). Each NAME of docs/benchmarks.md is a function of :data:`TABLES`,
each of docs/operations.md one of ``sizing.TABLES``, the README's ``fleet-summary``
``fleet_tables.t_fleet_summary``, fed by the result files it names
(written by ``bench/common.py:write_result``). A table whose results are missing says so
instead of showing figures. ``tests/unit/test_benchmarks_doc.py`` fails when a page is stale.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sizing
from docgen import MARKER as MARKER  # re-exported: tests/unit/test_benchmarks_doc.py
from docgen import (
    ROOT,
    Result,
    Tables,
    load,
    missing,
    num,
    rows_of,
    table,
    verdict,
)
from docgen import render as render_page
from fleet_tables import (
    t_auth_refused,
    t_auth_restart,
    t_fleet,
    t_fleet_server,
    t_fleet_summary,
    t_fleet_targets,
    t_host_footprint,
    t_proxy_renewals,
)
from traffic_tables import (
    t_accept_queue,
    t_churn,
    t_churn_tcp,
    t_deploys,
    t_dns,
    t_faults,
    t_propagation,
    t_scale,
    t_scale_targets,
    t_slowstart,
)

DOC = ROOT / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python scripts/gen_benchmarks.py"
# ---- the tables ---------------------------------------------------------------------------


def t_runs(results: dict[str, Result]) -> str:
    """One line per result file: when, on what load, from which commit, with which command."""
    if not results:
        return missing("*")
    out = []
    for stem, r in results.items():
        m = r.get("machine", {})
        load = m.get("loadavg_at_start") or []
        out.append([f"`{stem}`", r.get("started_utc", "—"), num(r.get("wall_s"), 0) + " s",
                    " / ".join(f"{x:.1f}" for x in load) or "—", m.get("cpus", "—"),
                    f"`{(m.get('commit') or '—')[:7]}`", f"`{r.get('command', '?')}`"])
    return table(["result", "started (UTC)", "took", "load avg 1/5/15 min at start", "cpus",
                  "commit", "command"], out)


def t_versions(results: dict[str, Result]) -> str:
    """Each component's version(s), as recorded by the results."""
    seen: dict[str, set[str]] = {}
    for r in results.values():
        for key, value in r.get("machine", {}).items():
            if key not in ("loadavg_at_start", "commit", "cpus") and value is not None:
                seen.setdefault(key, set()).add(str(value))
    if not seen:
        return missing("*")
    return table(["component", "version (as recorded)"],
                 [[k, "; ".join(f"`{v}`" for v in sorted(vs))] for k, vs in sorted(seen.items())])


def t_registration(results: dict[str, Result]) -> str:
    out = []
    for backend in ("etcd", "zk"):
        res = results.get(f"registration-{backend}")
        for r in rows_of(res):
            if "p50_ms" not in r:
                continue
            out.append([backend, r["metric"].replace("_", " "), f"{r['n']} / {r['expected']}",
                        num(r["p50_ms"]), num(r["p99_ms"]), num(r["max_ms"]),
                        num(r.get("host_cpu_busy_pct"), 0) + " %", r.get("target") or "—",
                        verdict(r.get("pass"))])
    if not out:
        return missing("registration-etcd", "registration-zk")
    return table(["backend", "metric", "n / expected", "p50 ms", "p99 ms", "max ms",
                  "host busy", "target", "result"], out)


def t_footprint(results: dict[str, Result]) -> str:
    out = []
    for backend in ("etcd", "zk"):
        res = results.get(f"registration-{backend}")
        rss = rows_of(res, metric="agent_rss")
        cpu = rows_of(res, metric="agent_idle_cpu")
        if not rss:
            continue
        r, c = rss[0], (cpu[0] if cpu else {})
        out.append([backend, f"{r['n']} / {r['expected']}", r.get("check", "—"),
                    f"{num(r['rss_mib'])} MiB ({num(r['rss_mb'])} MB)",
                    f"{num(r['rss_empty_mib'])} MiB",
                    f"{num(r['rss_anon_mib'])} / {num(r['rss_file_mib'])} MiB",
                    f"{num(r['pss_mib'])} MiB", r.get("threads", "—"),
                    f"{num(c.get('cpu_pct_of_one_core'), 2)} %",
                    num(r.get("host_cpu_busy_pct"), 0) + " %", verdict(r.get("pass"))])
    if not out:
        return missing("registration-etcd", "registration-zk")
    return table(["backend", "containers registered", "check", "RSS (max over the window)",
                  "RSS empty", "anon / file", "PSS", "threads", "idle CPU (of one core)",
                  "host busy", "RSS ≤ 60 MiB"], out)


#: a written-back row's hosts, by what their watch follows (``--follow``; own: no words)
FOLLOWS = {"none": ", no watch: own-key watches", "all": ", each host follows all"}


def _pair(a: Any, b: Any) -> str:
    return "—" if a is None else f"{num(a)} / {num(b)}"


def t_back(stem: str) -> Callable[[dict[str, Result]], str]:
    """bench/written_back.py: the prefix deleted (``written-back``) or every instance drained
    (``changed-back``, ``--fault drain``; ``weight0-back``, ``--fault weight0``: "back" is
    serving again, "empty" no instance serving) by hand, the write-back off and on; the
    ``-alone`` files: hosts with no watch (``--follow none``), on their own keys' watches; the
    ``-all`` files: every host follows the whole catalog (``--follow all``)."""
    drain = stem != "written-back"
    did = "drain" if drain else "delete"

    def render(results: dict[str, Result]) -> str:
        out = []
        for backend in ("etcd", "zk"):
            for r in [*rows_of(results.get(f"{stem}-{backend}")),
                      *rows_of(results.get(f"{stem}-all-{backend}")),  # --follow all
                      *rows_of(results.get(f"{stem}-alone-{backend}"))]:  # --follow none
                guard = [f"{r['guard_engaged']} / {r['guard_held_total']}"] if drain else []
                counts = ["on" if r.get("guard_counts_drains") else "off"] if drain else []
                out.append([backend,
                            f"{r['services']} ({r['instances'] // r['services']} a service)",
                            r["written_back"] + FOLLOWS.get(str(r.get("follow")), ""),
                            *counts, num(r["delete_took_s"]),
                            f"{r['back']} / {r['instances']}",
                            f"{num(r['back_p50_s'])} / {num(r['back_p99_s'])} / "
                            f"{num(r['back_max_s'])}",
                            f"{num(r['back_after_own_delete_p50_s'])} / "
                            f"{num(r['back_after_own_delete_max_s'])}",
                            f"{r['written_back_writes']} / {r['reconcile_writes']}",
                            _pair(r.get("written_back_p50_s"), r.get("written_back_max_s")),
                            num(r.get("host_cpu_ms")),
                            f"{r['observer_empty_services_most']} "
                            f"({num(r['observer_empty_service_s'])} service-s)", *guard,
                            r.get("target") or "—", verdict(r.get("pass"))])
        if not out:
            return missing(f"{stem}-etcd", f"{stem}-zk")
        return table(["backend", "services (instances)", "write-back",
                      *(["guard counts others' drains"] if drain else []), f"the {did} took, s",
                      "serving again" if drain else "back",
                      f"{'serving' if drain else 'back'} after the {did}'s start, s: "
                      "p50 / p99 / max",
                      f"{'serving' if drain else 'back'} after its own {did}, s: p50 / max",
                      "written back / by a reconcile",
                      "its host's write-back done after the start, s: p50 / max",
                      "CPU a host over the row, ms",
                      "observer: services with none serving at once (most)" if drain else
                      "observer: services empty at once (most)",
                      *(["observer's guard: engaged / held"] if drain else []),
                      "target", "result"], out)

    return render


def _flat(d: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def t_generic(stem: str) -> Callable[[dict[str, Result]], str]:
    """Any other result: its summary's scalars (nested keys joined by dots) as one table, and
    each list of rows in it as a table of its own."""

    def render(results: dict[str, Result]) -> str:
        res = results.get(stem)
        if res is None:
            return missing(stem)
        summary = res["summary"]
        parts = [table(["summary", "value"], [[f"`{k}`", num(v)] for k, v in _flat(summary)])]
        for key, rows in summary.items():
            if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                cols: list[str] = []
                for r in rows:
                    cols += [k for k, v in r.items()
                             if k not in cols and not isinstance(v, dict | list)]
                parts.append(f"`{key}`:\n\n" + table(cols, [[num(r.get(c)) for c in cols]
                                                           for r in rows]))
        return "\n\n".join(parts)

    return render


TABLES: dict[str, Callable[[dict[str, Result]], str]] = {
    "runs": t_runs,
    "versions": t_versions,
    "registration": t_registration,
    "footprint": t_footprint,
    "fleet": t_fleet,
    "fleet-targets": t_fleet_targets,
    "fleet-server": t_fleet_server,
    "host-footprint": t_host_footprint,
    "propagation": t_propagation,
    "churn": t_churn,
    "churn-tcp": t_churn_tcp,
    "accept-queue": t_accept_queue,
    "scale": t_scale,
    "scale-targets": t_scale_targets,
    "scale-baseline": lambda results: t_scale(results, "scale-baseline-etcd"),
    "dns": t_dns,
    "dns-abuse": t_generic("dns-abuse-none"),
    "proxy-renewals": t_proxy_renewals,
    "auth-restart": t_auth_restart,
    "auth-refused": t_auth_refused,
    "wipe-guard": t_generic("wipe-guard-none"),
    "per-change": t_generic("per-change-none"),
    "written-back": t_back("written-back"),
    "changed-back": t_back("changed-back"),
    "weight0-back": t_back("weight0-back"),
    "faults": t_faults,
    "deploys": t_deploys,
    "slowstart": t_slowstart,
}


def render(text: str, results: dict[str, Result]) -> str:
    """docs/benchmarks.md's ``text`` with every generated block rewritten."""
    return render_page(text, results, TABLES, "docs/benchmarks.md")


#: every generated page and the tables its blocks name
PAGES: dict[Path, Tables] = {DOC: TABLES, ROOT / "docs" / "operations.md": sizing.TABLES,
                             ROOT / "README.md": {"fleet-summary": t_fleet_summary}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = ap.parse_args(argv)
    results, stale = load(), 0
    for page, tables in PAGES.items():
        name = str(page.relative_to(ROOT))
        text = page.read_text()
        new = render_page(text, results, tables, name)
        if new == text:
            continue
        if args.check:
            sys.stderr.writelines(difflib.unified_diff(
                text.splitlines(keepends=True), new.splitlines(keepends=True), name,
                "generated"))
            print(f"{name} is out of date: run {COMMAND}", file=sys.stderr)
            stale += 1
        else:
            page.write_text(new)
            print(f"wrote {name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
