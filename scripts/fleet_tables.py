"""docs/benchmarks.md's fleet tables (issue 11), for ``scripts/gen_benchmarks.py``: the fleet
bench's rows by backend and size (``bench/fleet.py``), its targets and the members' state, the
per-host footprint (``bench/footprint.py``) and the renewal answers straight and through
``etcd grpc-proxy`` (``bench/proxy_renewals.py``)."""

from __future__ import annotations

import re

from docgen import TIMES, Result, fleet_rows, mean, missing, num, rows_of, table, verdict

FLEET_STEMS = ("fleet-etcd", "fleet-rerun-etcd", "fleet1000-etcd", "fleet-zk", "fleet-proxy-etcd",
               "fleet-ttl30-etcd", "fleet-ttl30-zk")


def _fleet_label(stem: str) -> str:
    return {"fleet1000-etcd": "etcd (a fleet of 1,000 from the start)",
            "fleet-proxy-etcd": "etcd via grpc-proxy",
            "fleet-rerun-etcd": "etcd, 4 workers",
            "fleet-ttl30-etcd": "etcd, TTL 30 s, `spread=10`",
            "fleet-ttl30-zk": "zk, TTL 30 s, `spread=10`"}.get(stem, stem.removeprefix("fleet-"))


def t_fleet(results: dict[str, Result], stems: tuple[str, ...] = FLEET_STEMS) -> str:
    """bench/fleet.py: one row per backend and size."""
    out = []
    for stem in stems:
        rows = fleet_rows(results, stem)
        for size in sorted({k[1] for k in rows}):
            st, ch = rows.get(("fleet_steady", size), {}), rows.get(("fleet_change", size), {})
            de, rs = rows.get(("fleet_host_death", size), {}), rows.get(("fleet_restart", size), {})
            sent = st.get("client_sent_bytes_per_s_per_host", {})
            recv = st.get("client_received_bytes_per_s_per_host", {})
            reads = st.get("reads_bytes_per_s_per_host", {})
            out.append([
                _fleet_label(stem), num(size), num(st.get("requests_per_s_per_host"), 3),
                f"{num(sent.get('p50'), 0)} / {num(recv.get('p50'), 0)} "
                f"(max {num(sent.get('max'), 0)} / {num(recv.get('max'), 0)})",
                f"{num(reads.get('p50'), 0)} (max {num(reads.get('max'), 0)})",
                f"{num(ch.get('n'))} / {num(ch.get('expected'))}: {num(ch.get('p50_ms'), 0)} / "
                f"**{num(ch.get('p99_ms'), 0)}** / {num(ch.get('max_ms'), 0)}" if ch else "—",
                f"{num(de.get('n'))} / {num(de.get('expected'))}: max "
                f"**{num((de.get('max_ms') or 0) / 1000, 2)} s**" if de else "—",
                f"{num(rs.get('n'))} / {num(rs.get('expected'))}: p50 "
                f"{num((rs.get('resync_p50_ms') or 0) / 1000, 1)} s, max "
                f"**{num((rs.get('resync_max_ms') or 0) / 1000, 1)} s**; mismatched "
                f"{num(rs.get('catalogs_mismatched_after'))}" if rs else "—",
                f"{num(rs.get('peak_requests_per_s'), 0)} / "
                f"{num(rs.get('steady_requests_per_s'), 0)} = "
                f"**{num(rs.get('peak_over_steady'))}{TIMES}**" if rs else "—",
                " / ".join(num(x, 0) for x in st.get("server_rss_mib", [])) + " MiB",
                " / ".join(num(x, 0) for x in st.get("server_cpu_pct", [])) + " %",
                num(mean(st.get("host_loadavg", [None])[:1]))])
        if (results.get(stem) or {}).get("samples", {}).get("not_measured"):
            sizes = [int(x) for x in re.findall(r"--sizes[ =]([0-9,]+)",
                                               results[stem]["command"])[:1]
                     for x in x.split(",")] or [250, 500, 1000]
            left = [z for z in sizes if z not in {k[1] for k in rows}]
            out.append([_fleet_label(stem), ", ".join(num(z) for z in left),
                        "_not measured: the fleet could not grow to this size (below)_",
                        *["—"] * 9])
    if not out:
        return missing(*stems)
    return table(["backend", "hosts", "requests/s per host (steady)",
                  "bytes/s per host sent / received, p50 (max)", "read B/s per host p50 (max)",
                  "one change: hosts reached: p50 / p99 / max ms", "host death: gone everywhere",
                  "full restart: resynced (from serving again)", "restart peak / steady req/s",
                  "member RSS", "member CPU (steady)", "load avg"], out)


def t_fleet_targets(results: dict[str, Result]) -> str:
    out = []
    for stem in FLEET_STEMS:
        for r in rows_of(results.get(stem)):
            if r.get("pass") is None:
                continue
            what = {"fleet_change": (f"one change: {num(r.get('n'))} of {num(r.get('expected'))}"
                                     f" hosts, p99 {num(r.get('p99_ms'), 0)} ms"),
                    "fleet_host_death": (f"host death: {num(r.get('n'))} of "
                                         f"{num(r.get('expected'))} hosts, max "
                                         f"{num((r.get('max_ms') or 0) / 1000, 2)} s "
                                         f"(TTL {num(r.get('ttl_s'), 0)} s)"),
                    "fleet_restart": (f"full restart: {num(r.get('n'))} of "
                                      f"{num(r.get('expected'))} hosts, max "
                                      f"{num((r.get('resync_max_ms') or 0) / 1000, 1)} s; peak "
                                      f"{num(r.get('peak_over_steady'))}{TIMES} steady"
                                      + (f" (over {num(r['peak_window_s'], 2)} s)"
                                         if r.get("peak_window_s") is not None else ""))
                    }.get(r["name"], r["name"])
            out.append([_fleet_label(stem), num(r["size"]), what, r.get("target", "—"),
                        verdict(r["pass"])])
    if not out:
        return missing("fleet-etcd", "fleet-zk")
    return table(["backend", "hosts", "measured", "target", "result"], out)


def t_fleet_server(results: dict[str, Result]) -> str:
    """What the servers hold at each size (summed over the 3 members)."""
    out = []
    keys = {"etcd": [("etcd_mvcc_db_total_size_in_use_in_bytes", "db in use (B, 3 members)"),
                     ("etcd_debugging_mvcc_keys_total", "keys (3 members)"),
                     ("etcd_debugging_mvcc_watch_stream_total", "watch streams"),
                     ("etcd_debugging_mvcc_watcher_total", "watchers")],
            "zk": [("zk_approximate_data_size", "data size (B, 3 members)"),
                   ("zk_znode_count", "znodes (3 members)"),
                   ("zk_num_alive_connections", "connections"),
                   ("zk_watch_count", "watches")]}
    for stem in FLEET_STEMS:
        backend = "zk" if stem.endswith("zk") else "etcd"
        for r in rows_of(results.get(stem), name="fleet_steady"):
            srv = r.get("server", {})
            cells = "; ".join(f"{label} {num(srv.get(k))}" for k, label in keys[backend])
            out.append([_fleet_label(stem), num(r["size"]), cells,
                        num(r.get("connections")),
                        " / ".join(num(x, 0) for x in r.get("server_rss_mib", [])) + " MiB",
                        num(r.get("relay_cpu_pct")) + " %" if r.get("relay_cpu_pct") is not None
                        else "—",
                        num(r.get("proxy_cpu_pct")) + " %" if r.get("proxy_cpu_pct") is not None
                        else "—",
                        " / ".join(num(x, 0) for x in r.get("worker_rss_mib", [])) + " MiB"])
    if not out:
        return missing("fleet-etcd", "fleet-zk")
    return table(["backend", "hosts", "server state (summed over members)",
                  "fleet connections", "member RSS", "relay CPU", "grpc-proxy CPU",
                  "worker processes RSS"], out)


def t_host_footprint(results: dict[str, Result]) -> str:
    out = []
    for r in rows_of(results.get("footprint-etcd")):
        out.append([num(r["containers"]), num(r["catalog"]), num(r["routed_services"]),
                    f"**{num(r['rss_mb'])} MB** ({num(r['rss_mib'])} MiB)",
                    f"{num(r['hwm_mb'])} MB", f"{num(r['rss_anon_mib'])} / "
                    f"{num(r['rss_file_mib'])} MiB", f"{num(r['pss_mib'])} MiB",
                    num(r.get("threads")), f"{num(r.get('cpu_pct_of_one_core'), 2)} %",
                    f"{num(r['haproxy_rss_mb'])} MB ({num(r['haproxy_pss_mb'])} MB PSS, "
                    f"{num(r['haproxy_processes'])} processes)", r.get("target", "—"),
                    verdict(r.get("pass"))])
    if not out:
        return missing("footprint-etcd")
    return table(["containers", "catalog", "services routed", "`discovery up` RSS (max)",
                  "peak (VmHWM)", "anon / file", "PSS", "threads", "CPU (of one core)",
                  "HAProxy RSS (master + workers)", "target", "result"], out)


def t_proxy_renewals(results: dict[str, Result]) -> str:
    out = []
    for r in rows_of(results.get("proxy-renewals-etcd")):
        odds = r["odds_taken_for_a_member"]
        out.append([r["path"], num(r["n"]), f"{num(r['within_fast'])} (≤ {r['fast_s']:g} s)",
                    f"{num(r['over_late'])} (> {r['late_s']:g} s)", num(r["p50_ms"], 2),
                    num(r["min_ms"], 2), num(r["max_ms"], 2),
                    "—" if odds is None else f"{odds:.1e}"])
    if not out:
        return missing("proxy-renewals-etcd")
    return table(["path", "renewals", "answered within FAST", "answered after LATE",
                  "p50 ms", "min ms", "max ms", "odds of passing for a member"], out)


#: the README's summary: the fleet bench's main runs, by column
SUMMARY_STEMS = (("fleet-etcd", "etcd"), ("fleet-proxy-etcd", "etcd via `etcd grpc-proxy`"),
                 ("fleet-zk", "ZooKeeper"))


def _limits(target: str) -> tuple[float | None, float | None]:
    """The restart row's target text -> (resync seconds, peak ratio)."""
    within = re.search(r"within ([0-9.]+) s", target)
    peak = re.search(r"peak <= ([0-9.]+) x", target)
    return (float(within.group(1)) if within else None, float(peak.group(1)) if peak else None)


def _cell(values: list[tuple[str, bool | None]], unit: str) -> str:
    """Figures at 250 / 500 / 1,000 hosts; one that missed its target in bold, marked."""
    return " / ".join(f"**{v} (miss)**" if ok is False else v for v, ok in values) + unit


def t_fleet_summary(results: dict[str, Result]) -> str:
    """README: each issue-11 figure at 250 / 500 / 1,000 hosts, one column a backend."""
    cols: list[list[str]] = []
    for stem, _label in SUMMARY_STEMS:
        rows = fleet_rows(results, stem)
        sizes = sorted({k[1] for k in rows})
        by = {name: [rows.get((name, z), {}) for z in sizes]
              for name in ("fleet_steady", "fleet_change", "fleet_host_death", "fleet_restart")}
        resync, peak = [], []
        for r in by["fleet_restart"]:
            max_s, max_ratio = _limits(r.get("target") or "")
            s, ratio = (r.get("resync_max_ms") or 0) / 1000, r.get("peak_over_steady")
            resync.append((num(s, 1), None if max_s is None else
                           s <= max_s and not r.get("hosts_missed")))
            peak.append((num(ratio), None if max_ratio is None or ratio is None
                         else ratio <= max_ratio))
        cols.append([
            " / ".join(num(r.get("requests_per_s_per_host"), 3) for r in by["fleet_steady"]),
            _cell([(num(r.get("p99_ms"), 0), r.get("pass")) for r in by["fleet_change"]], " ms"),
            _cell([(num((r.get("max_ms") or 0) / 1000, 2), r.get("pass"))
                   for r in by["fleet_host_death"]], " s"),
            _cell(resync, " s"), _cell(peak, TIMES)])
    if not any(c[0] for c in cols):
        return missing(*(s for s, _ in SUMMARY_STEMS))
    what = ["registry requests a host and second, steady (flat as the fleet grows)",
            "one change on every host: p99 (≤ 250 ms)",
            "a dead host gone from every catalog: max (≤ TTL + 1 s, TTL 10 s)",
            "full restart of the registry: every host resynced within (≤ 10 s)",
            f"full restart: peak request rate over the steady one (≤ 3{TIMES})"]
    return table(["at 250 / 500 / 1,000 hosts", *(label for _, label in SUMMARY_STEMS)],
                 [[w, *(c[i] for c in cols)] for i, w in enumerate(what)])
