"""The tables of docs/benchmarks.md for the benches that send requests through the routing:
propagation, connection churn, the accept queue, the scale bench, DNS, faults, deploys and
the cold instance's ramp (``slowstart``). ``scripts/gen_benchmarks.py`` names them in its
``TABLES``."""

from __future__ import annotations

from typing import Any

from docgen import TIMES, Result, missing, num, rows_of, table, verdict


def t_propagation(results: dict[str, Result]) -> str:
    out = []
    for backend in ("etcd", "zk"):
        for r in rows_of(results.get(f"propagation-{backend}")):
            out.append([backend, r["name"].replace("_", " "), f"{r['n']} / {r['expected']}",
                        num(r["p50_ms"]), num(r["p99_ms"]), num(r["max_ms"]),
                        f"{num(r.get('split_agent_p50_ms'))} / {num(r.get('split_agent_p99_ms'))}",
                        f"{num(r.get('split_watcher_p50_ms'))} / "
                        f"{num(r.get('split_watcher_p99_ms'))}",
                        r.get("watcher_wait", "—"), num(r.get("host_cpu_busy_pct"), 0) + " %",
                        r.get("target") or "—", verdict(r.get("pass"))])
    if not out:
        return missing("propagation-etcd", "propagation-zk")
    return table(["backend", "metric", "n / expected", "p50 ms", "p99 ms", "max ms",
                  "agent p50 / p99", "watcher p50 / p99", "window", "host busy", "target",
                  "result"], out)


def t_churn(results: dict[str, Result]) -> str:
    out = []
    for conn in ("keep-alive", "close"):
        for r in rows_of(results.get(f"churn-{conn}-etcd")):
            mode = ("runtime API (`discovery watch`)" if r["mode"] == "runtime-api"
                    else f"reload per change (tuning `{r.get('baseline_tuning')}`)")
            errs = r.get("wrk_errors", {})
            out.append([conn, mode, num(r["n"]), f"**{num(r['lost'])}**",
                        num(r.get("bad_status")), num(errs.get("read")),
                        num(r.get("haproxy_reloads")), num(r["p50_ms"]), num(r["p99_ms"]),
                        num(r["max_ms"]), num(r.get("cpu_ms_per_change")),
                        f"{num(r.get('old_workers_peak'))} / "
                        f"{num(r.get('old_workers_peak_rss_mib'))} MiB",
                        num(r.get("host_cpu_busy_pct"), 0) + " %", verdict(r.get("pass"))])
    if not out:
        return missing("churn-keep-alive-etcd", "churn-close-etcd")
    return table(["client", "router", "answered", "lost", "4xx/5xx", "wrk read errors",
                  "reloads", "p50 ms", "p99 ms", "max ms", "CPU ms per change",
                  "old workers peak / their RSS", "host busy", "0 lost of ≥ 20,000"], out)


def t_churn_tcp(results: dict[str, Result]) -> str:
    out = []
    for conn in ("keep-alive", "close"):
        rows = rows_of(results.get(f"churn-{conn}-etcd"))
        if not rows:
            continue
        r = rows[0]
        q = r.get("accept_queues", {})
        qs = "; ".join(f"{k}: {v['max_recv_q']} of {v['backlog']}" for k, v in sorted(q.items()))
        out.append([conn, num(r.get("churn_seconds")) + " s", num(r.get("tcp_listen_overflows")),
                    num(r.get("tcp_listen_drops")), num(r.get("tcp_syn_retrans")),
                    num(r.get("tcp_retrans_segs")), qs or "—"])
    if not out:
        return missing("churn-keep-alive-etcd", "churn-close-etcd")
    return table(["client", "churn took", "TcpExtListenOverflows", "TcpExtListenDrops",
                  "TcpExtTCPSynRetrans", "TcpRetransSegs",
                  "accept queue peak (Recv-Q of backlog, `ss -ltn` every 250 ms)"], out)


def t_accept_queue(results: dict[str, Result]) -> str:
    res = results.get("accept-queue-none")
    if res is None:
        return missing("accept-queue-none")
    out = []
    for r in rows_of(res):
        out.append([f"`{r['variant']}`", r["load"], num(r["n"]), num(r["p50_ms"]),
                    num(r["p99_ms"]), num(r["p99_9_ms"]), num(r["max_ms"]),
                    num(r.get("tcp_listen_overflows")), num(r.get("tcp_listen_drops")),
                    num(r.get("tcp_syn_retrans")), num(r.get("app_backlog")),
                    num(r.get("host_cpu_busy_pct"), 0) + " %"])
    return table(["variant", "load", "requests", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                  "ListenOverflows", "ListenDrops", "TCPSynRetrans", "app backlog",
                  "host busy"], out)


def t_scale(results: dict[str, Result], stem: str = "scale-etcd") -> str:
    res = results.get(stem)
    if res is None:
        return missing(stem)
    runs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows_of(res):
        runs.setdefault((r["size"], r["wait"]), {})[r["name"]] = r
    out = []
    for (size, wait), m in runs.items():
        first = m.get("scale_first_valid_config", {})
        add, rem = m.get("scale_apply_add", {}), m.get("scale_apply_remove", {})
        bulk, rss = m.get("scale_bulk_change"), m.get("scale_watcher_rss", {})
        starts = first.get("starts_ms")  # several starts: their median, then each
        shown = f"{num(first.get('value'))} ms" + (
            f" (median of {', '.join(num(v) for v in starts)})" if starts and len(starts) > 1
            else "")
        out.append([size.replace("x", f" {TIMES} "), wait, shown,
                    f"{num(add.get('p50_ms'))} / {num(add.get('p99_ms'))}",
                    f"{num(rem.get('p50_ms'))} / {num(rem.get('p99_ms'))}",
                    (f"{num(bulk['applied_ms'])} ms ({num(bulk['servers_before'])} servers, "
                     f"{bulk['haproxy_reloads']} reloads)") if bulk else "—",
                    f"{num(rss.get('value'))} / {num(rss.get('hwm_mb'))} MB",
                    f"{num(rss.get('haproxy_rss_mib'))} MiB",
                    num(first.get("host_cpu_busy_pct"), 0) + " %"])
    return table(["size", "window", "first valid config", "add p50 / p99 ms",
                  "remove p50 / p99 ms", "bulk change (a host's lease revoked)",
                  "router process RSS / peak", "HAProxy RSS (master + workers)", "host busy"], out)


def t_scale_targets(results: dict[str, Result]) -> str:
    res = results.get("scale-etcd")
    if res is None:
        return missing("scale-etcd")
    out = []
    for r in rows_of(res):
        if r.get("pass") is None:
            continue
        what = {"scale_first_valid_config": "first valid config",
                "scale_apply_add": "apply one change (add), p99",
                "scale_apply_remove": "apply one change (remove), p99",
                "scale_bulk_change": "bulk change applied, no reload",
                "scale_watcher_rss": "watcher peak RSS"}.get(r["name"], r["name"])
        value = r.get("value") if "value" in r else r.get("p99_ms")
        out.append([f"{r['size'].replace('x', f' {TIMES} ')}, {r['wait']}", what,
                    f"{num(value)} {r.get('unit', 'ms')}", r.get("target") or "—",
                    verdict(r["pass"])])
    return table(["run", "metric", "measured", "target", "result"], out)


def t_dns(results: dict[str, Result]) -> str:
    res = results.get("dns-none")
    if res is None:
        return missing("dns-none")
    out = []
    for r in res["summary"]["rows"]:
        rounds = ", ".join(num(q) for q in r["discovery_rounds"])
        theirs = ", ".join(num(q) for q in r["dnsmasq_rounds"])
        add = " / ".join("yes" if x else "NO" for x in r["additional_correct"])
        out.append([r["workload"], r["qtype"], num(r["query_names"]),
                    num(r.get("changes_per_s")), f"{num(round(r['discovery_qps']))} ({rounds})",
                    f"{num(round(r['dnsmasq_qps']))} ({theirs})",
                    f"{r['ratio']:.2f} ({r['worst_ratio']:.2f})",
                    " / ".join(num(x) for x in r["lost"]), "yes" if r["correct"] else "NO", add,
                    r["cpu_us_per_query"]])
    ref = res["summary"].get("coredns_reference_qps")
    note = (f"\n\nCoreDNS, for reference: about {num(ref)} qps on 2 vCPU, a published figure "
            "(cited, not measured here)." if ref else "")
    return table(["workload", "query", "distinct names", "catalog changes/s",
                  "discovery qps median (rounds)", "dnsmasq qps median (rounds)",
                  "ratio (worst round)", "lost (ours / dnsmasq)", "answers correct",
                  "additional section correct (ours / dnsmasq)",
                  "CPU µs/query user+sys (ours / dnsmasq)"], out) + note


def _s(v: Any) -> str:
    return "—" if v is None else f"{v:g} s"


def t_faults(results: dict[str, Result]) -> str:
    """bench/faults.py: one row per fault and backend."""
    out = []
    for backend in ("etcd", "zk"):
        res = results.get(f"faults-{backend}")
        for r in rows_of(res):
            failed = f"{num(r['failed'])} / {num(r['requests'])}"
            span = (f"{r['failed_from_s']:g} → {r['failed_until_s']:g} s" if r["failed"]
                    else "—")
            out.append([backend, r["what"], f"**{failed}**" if r["failed"] else failed, span,
                        _s(r.get("serving_again_s")) if r["failed"] else "—",
                        _s(r.get("registry_complete_s")), _s(r.get("routed_all_s")),
                        num(r.get("missing_peak")), f"**{num(r.get('lost'))}**",
                        num(r.get("stale")), num(r.get("host_cpu_busy_pct"), 0) + " %",
                        r.get("target") or "—", verdict(r.get("pass"))])
        for what in (res or {}).get("samples", {}).get("not_measured", []):
            out.append([backend, f"_not measured_: {what}", *["—"] * 11])
    if not out:
        return missing("faults-etcd", "faults-zk")
    return table(["backend", "fault", "failed / requests", "failing (after the fault)",
                  "serving again after",
                  "registry complete after the heal", "every instance served after the heal",
                  "missing at worst", "lost", "stale", "host busy", "target", "result"], out)


def t_deploys(results: dict[str, Result]) -> str:
    """bench/deploys.py: outlier ejection off/on and the rolling replacement."""
    res = results.get("deploys-etcd")
    out = []
    for r in rows_of(res, name="outlier"):
        after = (f"{num(r['failed_after_ejection'])} / {num(r['n_after_ejection'])}"
                 if r["ejection_s"] is not None else "—")
        out.append([f"gray failure, outlier {r['mode']}", f"{num(r['failed'])} / {num(r['n'])}",
                    f"{100 * r['failed_share']:.2f} %", _s(r["ejection_s"]), after,
                    verdict(r["pass"])])
    for r in rows_of(res, name="deploy"):
        out.append([f"deploy: {r['mode']}, requests 0-2 s", f"{num(r['failed'])} / {num(r['n'])}",
                    f"{100 * r['failed'] / max(1, r['n']):.2f} %", "—", "—", verdict(r["pass"])])
    if not out:
        return missing("deploys-etcd")
    return table(["phase", "failed / requests", "failed share", "ejected after",
                  "failed / requests after the ejection", "result"], out)


def t_slowstart(results: dict[str, Result]) -> str:
    """bench/deploys.py: a cold instance joining, per mode: p50/p99 steady vs during the ramp."""
    out = []
    for r in rows_of(results.get("deploys-etcd"), name="slowstart"):
        if "steady_p50_ms" not in r:
            continue  # a run from before the modes were measured side by side
        share = ", ".join(f"{100 * x:.0f}" for x in r["cold_share_per_s"])
        out.append([r["mode"], _s(r["traffic_after_start_s"]),
                    f"{num(r['steady_p50_ms'])} / {num(r['steady_p99_ms'])}",
                    f"{num(r['ramp_p50_ms'])} / {num(r['ramp_p99_ms'])}",
                    f"{num(r['ratio'], 2)}{TIMES}",
                    f"{num(r['ramp_over_1.5x'])} of {num(r['ramp_n'])}",
                    num(r["cold_requests_in_ramp"]), share, num(r["failed"]),
                    verdict(r["pass"])])
    if not out:
        return missing("deploys-etcd")
    return table(["mode", "traffic after the app starts", "steady p50 / p99 ms",
                  "ramp p50 / p99 ms", "ramp p99 / steady p99",
                  f"ramp requests > 1.5{TIMES} steady p99",
                  "cold instance's requests in the ramp", "cold share per second (%)", "failed",
                  f"p99 <= 1.5{TIMES} steady"], out)
