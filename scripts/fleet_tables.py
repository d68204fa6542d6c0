"""docs/benchmarks.md's fleet tables (issue 11), for ``scripts/gen_benchmarks.py``: the fleet
bench's rows by backend and size (``bench/fleet.py``), its targets and the members' state, the
per-host footprint (``bench/footprint.py``) and the renewal answers straight and through
``etcd grpc-proxy`` (``bench/proxy_renewals.py``)."""

from __future__ import annotations

import re
from typing import Any

from docgen import TIMES, Result, fleet_rows, mean, missing, num, rows_of, table, verdict

FLEET_STEMS = ("fleet-etcd", "fleet-rerun-etcd", "fleet1000-etcd", "fleet-zk", "fleet-spread6-zk",
               "fleet-proxy-etcd", "fleet-proxy-ownkeys-etcd", "fleet-ttl30-etcd",
               "fleet-ttl30-zk")


def _fleet_label(stem: str) -> str:
    return {"fleet1000-etcd": "etcd (a fleet of 1,000 from the start)",
            "fleet-proxy-etcd": "etcd via grpc-proxy, `own=services`",
            "fleet-proxy-ownkeys-etcd": "etcd via grpc-proxy, `own=keys`",
            "fleet-rerun-etcd": "etcd, 4 workers",
            "fleet-ttl30-etcd": "etcd, TTL 30 s, `spread=10`",
            "fleet-ttl30-zk": "zk, TTL 30 s, `spread=10`",
            "fleet-spread6-zk": "zk, `spread=6`"}.get(stem, stem.removeprefix("fleet-"))


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
    for r in [*rows_of(results.get("footprint-etcd")), *rows_of(results.get("footprint-zk"))]:
        out.append([r.get("backend", "etcd"), num(r["containers"]), num(r["catalog"]),
                    num(r["routed_services"]),
                    f"**{num(r['rss_mb'])} MB** ({num(r['rss_mib'])} MiB)",
                    f"{num(r['hwm_mb'])} MB", f"{num(r['rss_anon_mib'])} / "
                    f"{num(r['rss_file_mib'])} MiB", f"{num(r['pss_mib'])} MiB",
                    num(r.get("threads")), f"{num(r.get('cpu_pct_of_one_core'), 2)} %",
                    f"{num(r['haproxy_rss_mb'])} MB ({num(r['haproxy_pss_mb'])} MB PSS, "
                    f"{num(r['haproxy_processes'])} processes)", r.get("target", "—"),
                    verdict(r.get("pass"))])
    if not out:
        return missing("footprint-etcd")
    return table(["backend", "containers", "catalog", "services routed",
                  "`discovery up` RSS (max)",
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


def t_auth_restart(results: dict[str, Result]) -> str:
    out = []
    for r in rows_of(results.get("auth-restart-etcd")):
        out.append([f"`{r['mode']}`", r["token"], num(r["bcrypt_cost"]), num(r["hosts"]),
                    num(r["members_serving_after_s"], 2),
                    f"{num(r['resynced'])} of {num(r['hosts'])}", num(r["resynced_p50_s"], 2),
                    num(r["resynced_max_s"], 2), num(r["logins"]), num(r["members_cpu_s"]),
                    verdict(r["pass"])])
    if not out:
        return missing("auth-restart-etcd")
    return table(["mode", "token", "bcrypt cost", "hosts", "members serve again after s",
                  "resynced", "p50 s", "max s", "logins after the restart",
                  "members' CPU s until resynced", "every host within 10 s"], out)


def t_auth_refused(results: dict[str, Result]) -> str:
    out = []
    for r in rows_of(results.get("auth-refused-etcd")):
        out.append([f"`{r['mode']}`", num(r["hosts"]), num(r["window_s"]),
                    num(r["failed_logins"]), num(r["failed_logins_per_host_min"], 2),
                    num(r["failed_logins_per_host_min_last"], 2), num(r["watch_streams"]),
                    num(r["members_cpu_cores"], 2), num(r["members_cpu_cores_last"], 2),
                    num(r.get("members_cpu_cores_peak_last"), 2),
                    f"{num(r['hosts_told_up'])} / {num(r['hosts_down_at_end'])}",
                    f"{num(r['followed_again'])} of {num(r['hosts'])}",
                    num(r["followed_again_p50_s"], 2), num(r["followed_again_max_s"], 2)])
    if not out:
        return missing("auth-refused-etcd")
    return table(["mode", "hosts", "refused for s", "failed logins",
                  "a host a minute", "a host a minute, its last `--tail` s", "watch streams",
                  "members' CPU, cores", "cores, its last `--tail` s", "busiest 5 s of those",
                  "hosts told up while refused / down at its end", "followed again",
                  "p50 s after the fix", "max s"], out)


#: the README's summary: the fleet bench's main runs, by column, and the sizes it grows to
SUMMARY_STEMS = (("fleet-etcd", "etcd"),
                 ("fleet-proxy-etcd", "etcd via `etcd grpc-proxy`, `own=services`"),
                 ("fleet-zk", "ZooKeeper"),
                 ("fleet-spread6-zk", "ZooKeeper, `spread=6`"))
SUMMARY_SIZES = (250, 500, 1000)
#: the summary's lines: what, the bench's row and how one row shows its figure
SUMMARY_LINES = (
    ("registry requests a host and second, steady (flat as the fleet grows)", "fleet_steady"),
    ("one change on every host: p99", "fleet_change"),
    ("a dead host gone from every catalog: the last", "fleet_host_death"),
    ("full restart of the registry: every host resynced within, peak over steady",
     "fleet_restart"),
)


def _seconds(ms: float | None, digits: int = 1) -> str:
    """Milliseconds as seconds, with two digits below one second."""
    if ms is None:
        return "—"
    return f"{num(ms / 1000, digits if ms >= 1000 else 2)} s"


def _figure(name: str, r: dict[str, Any]) -> str:
    if name == "fleet_steady":
        return num(r.get("requests_per_s_per_host"), 3)
    if name == "fleet_change":
        return "—" if r.get("p99_ms") is None else f"{num(r['p99_ms'], 0)} ms"
    if name == "fleet_host_death":
        return _seconds(r.get("max_ms"), 2)
    ratio = r.get("peak_over_steady")
    return f"{_seconds(r.get('resync_max_ms'))}, " + (
        "—" if ratio is None else f"{num(ratio)}{TIMES}")


def _sizes(rows: dict[tuple[str, int], dict[str, Any]], name: str) -> str:
    """One backend's figures of ``name`` at each size: a dash for a size it never reached, a
    figure whose row missed its target in bold, marked."""
    shown = []
    for size in SUMMARY_SIZES:
        r = rows.get((name, size))
        figure = "—" if r is None else _figure(name, r)
        shown.append(f"**{figure} (miss)**" if r is not None and r.get("pass") is False
                     else figure)
    return " / ".join(shown)


def t_fleet_summary(results: dict[str, Result]) -> str:
    """README: the issue-11 figures at 250 / 500 / 1,000 hosts, one column a backend; a figure
    whose row missed its target (the row's own ``pass``) in bold, marked."""
    if not any(results.get(stem) for stem, _ in SUMMARY_STEMS):
        return missing(*(stem for stem, _ in SUMMARY_STEMS))
    backends = {stem: fleet_rows(results, stem) if stem in results else None
                for stem, _ in SUMMARY_STEMS}
    out = []
    for what, name in SUMMARY_LINES:
        target = next((str(r["target"]) for rows in backends.values() for (n, _), r in
                       (rows or {}).items() if n == name and r.get("target")), "")
        out.append([f"{what} (target: {target})" if target else what,
                    *(f"no `{stem}.json`" if rows is None else _sizes(rows, name)
                      for stem, rows in backends.items())])
    return table(["at 250 / 500 / 1,000 hosts", *(label for _, label in SUMMARY_STEMS)], out)
