"""``bench/routing.py``'s churn phase: rolling replacements under ``wrk`` load, side by side
through ``discovery watch`` (HAProxy's runtime API) and ``bench/reload_per_change.py`` (a full
render and reload per change, as consul-template and confd do).
"""


from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Self

from common import CLK_TCK, Unmeasured, _r, percentile, say
from procs import (
    HOST,
    Daemon,
    HostLoad,
    Routed,
    answers_200,
    children_of,
    cpu_ticks,
    discovery_cmd,
    rss_kib,
    wait_until,
)
from routing_rig import Containers, RegistryLog, Run, app_labels, other_containers

from tests.harness.servers import ServerCluster
from tests.harness.util import free_port

TARGET_CHURN_MIN_REQUESTS = 20_000

# Counts requests written (``request()``) and responses read (``response()``), so that a
# connection closed while idle (no request on it: wrk still counts a ``read`` error and
# reconnects) is told apart from a request that got no answer (lost).
WRK_LUA = """-- written by bench/routing.py
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; answered = 0; bad = 0 end
function delay() return %(delay)d end
function request() sent = sent + 1; return wrk.format() end
function response(status, headers, body)
  answered = answered + 1
  if status >= 400 then bad = bad + 1 end
end
done = function(summary, latency, requests)
  local sent, answered, bad = 0, 0, 0
  for _, t in ipairs(threads) do
    sent = sent + t:get("sent"); answered = answered + t:get("answered"); bad = bad + t:get("bad")
  end
  local pct = {}
  for _, p in ipairs({50, 90, 99, 99.9, 99.99}) do
    table.insert(pct, string.format('"%%g":%%d', p, latency:percentile(p)))
  end
  io.write(string.format(
    '\\nWRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,'
    .. '"status":%%d,"timeout":%%d,"sent":%%d,"answered":%%d,"bad_status":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d,"max_us":%%d,"percentiles_us":{%%s}}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, sent, answered, bad,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(pct, ",")))
end
"""
LOADS = {"keep-alive": False, "close": True}  # --churn-loads name -> Connection: close


def start_wrk(port: int, work: Path, label: str, *, conns: int, delay_ms: int,
              close: bool, max_seconds: int) -> Daemon:
    script = work / "churn.lua"
    if not script.exists():
        script.write_text(WRK_LUA % {"delay": delay_ms})
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max_seconds}s", "--timeout", "5s", "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    return Daemon([*argv, f"http://{HOST}:{port}/"], work / f"wrk-{label}.log").start()


def wrk_result(d: Daemon) -> dict[str, Any]:
    for line in reversed(d.log_text().splitlines()):
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON "):])
            return data
    raise Unmeasured(f"wrk printed no summary:\n{d.log_tail()}")


class IdleClients:
    """Long-lived keep-alive client connections to ``port``: ``initial`` at once, then one more
    every ``every`` s (at most ``limit``), each sending one request and then staying idle until
    :meth:`close` (like pooled HTTP clients between bursts). Opening them over time means each
    HAProxy worker generation holds some, which is what keeps old workers alive after reloads."""

    def __init__(self, port: int, initial: int, every: float = 0.5, limit: int = 200) -> None:
        self.port, self.every, self.limit = port, every, limit
        self.socks: list[socket.socket] = []
        self.failed = 0
        self._stop = threading.Event()
        for _ in range(initial):
            self._open()
        self._thread = threading.Thread(target=self._run, daemon=True, name="idle-clients")
        if every > 0:
            self._thread.start()

    def _open(self) -> None:
        try:
            s = socket.create_connection((HOST, self.port), 2.0)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            s.recv(4096)
        except OSError:
            self.failed += 1
            return
        self.socks.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.every) and len(self.socks) < self.limit:
            self._open()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class ProcSampler:
    """Every ``period`` s: each HAProxy master's processes (old workers = children beyond the
    newest one) and their RSS, and the listen sockets' accept queues (``ss -ltn``)."""

    def __init__(self, masters: Mapping[str, int | None], ports: dict[int, str],
                 period: float = 0.25) -> None:
        self.masters = {k: v for k, v in masters.items() if v is not None}
        self.ports, self.period = ports, period  # the caller adds app ports as they come
        self.peak_old: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_rss_kib: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_old_rss_kib: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.accept_queue: dict[str, dict[str, int]] = {}  # role -> max Recv-Q, backlog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="proc-sampler")

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for mode, master in self.masters.items():
                kids = sorted(children_of(master))
                old = kids[:-1]  # the newest child is the current worker
                rss = [rss_kib(k).get("VmRSS", 0) for k in kids]
                self.peak_old[mode] = max(self.peak_old[mode], len(old))
                total = rss_kib(master).get("VmRSS", 0) + sum(rss)
                self.peak_rss_kib[mode] = max(self.peak_rss_kib[mode], total)
                self.peak_old_rss_kib[mode] = max(self.peak_old_rss_kib[mode], sum(rss[:-1]))
            self._sample_ss()

    def _sample_ss(self) -> None:
        try:
            out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4 or not parts[1].isdigit():
                continue
            port = int(parts[3].rpartition(":")[2] or 0)
            role = self.ports.get(port)
            if role is None:
                continue
            q = self.accept_queue.setdefault(role, {"max_recv_q": 0, "backlog": 0})
            q["max_recv_q"] = max(q["max_recv_q"], int(parts[1]))
            q["backlog"] = max(q["backlog"], int(parts[2]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_churn(run: Run, backend: str, server: ServerCluster, load: str) -> None:
    """One churn run under ``load`` (``keep-alive`` or ``close``): both routers side by side."""
    args, report = run.args, run.report
    assert run.client is not None
    close = LOADS[load]
    url = server.url(f"/bench-churn-{load}-{run.token}")
    svc = run.service
    grace = float(args.churn_grace)
    mark = report.mark()
    with contextlib.ExitStack() as stack:
        agent = Daemon(discovery_cmd("agent", "--registry", url, "--node", "rt-churn"),
                       run.work / f"agent-churn-{load}.log").start()
        stack.callback(agent.stop)
        reglog = RegistryLog(url)
        stack.callback(reglog.close)
        containers = Containers(run.client, run.image)
        stack.callback(containers.close)
        port_a, port_b = free_port(), free_port()
        ours = Routed.watcher(url, {svc: port_a}, run.work)
        ours.start()
        stack.callback(ours.close)
        base = Routed.baseline(url, {svc: port_b}, run.work, tuning=args.baseline_tuning)
        base.start()
        stack.callback(base.close)
        ours.wait_ready([port_a])
        base.wait_ready([port_b])

        pool: list[tuple[str, str]] = []  # (cid, name), oldest first
        n = 0

        def start_one() -> tuple[str, str]:
            nonlocal n
            with lock:
                n += 1
                name = f"rt-churn-{n}-{run.token}"
            cport = free_port()
            app_ports[cport] = "app"
            cid = containers.start(name, cport, app_labels(svc, cport, check="tcp"), grace=grace)
            if reglog.wait_put(cid, 30.0) is None:
                raise Unmeasured(f"{name} not registered within 30 s")
            return cid, name

        lock = threading.Lock()
        app_ports: dict[int, str] = {port_a: "runtime-api", port_b: "reload-per-change"}
        for _ in range(args.churn_pool):
            pool.append(start_one())
        for p in (port_a, port_b):
            wait_until(partial(answers_200, p), 30, f"the pool served on :{p}")
        time.sleep(0.5)  # both HAProxies have the whole pool
        reloads_before = (ours.reload_count() or 0, base.reload_count() or 0)
        idle = [IdleClients(p, args.idle_conns, every=args.idle_every) for p in (port_a, port_b)]
        for c in idle:
            stack.callback(c.close)

        say(f"churn ({load}): wrk on :{port_a} (runtime API) and :{port_b} (reload per "
            f"change, tuning {args.baseline_tuning}), {args.replacements} rolling "
            f"replacements, {args.churn_parallel} at a time, {args.idle_conns} idle "
            f"keep-alive connections each, one more every {args.idle_every:g} s")
        wrk_opts: dict[str, Any] = {"conns": args.wrk_conns, "delay_ms": args.wrk_delay_ms,
                                    "close": close, "max_seconds": 600}
        wrk_a = start_wrk(port_a, run.work, f"runtime-api-{load}", **wrk_opts)
        stack.callback(wrk_a.stop, signal.SIGKILL)
        wrk_b = start_wrk(port_b, run.work, f"reload-per-change-{load}", **wrk_opts)
        stack.callback(wrk_b.stop, signal.SIGKILL)
        time.sleep(1.0)

        todo = [args.replacements]
        errors: list[BaseException] = []
        done_times: list[float] = []

        def worker() -> None:
            while True:
                with lock:
                    if todo[0] <= 0 or errors:
                        return
                    todo[0] -= 1
                try:
                    t0 = time.monotonic()
                    new = start_one()
                    with lock:
                        old = pool.pop(0)
                        pool.append(new)
                    containers.stop_signal(old[0], grace + 2.0)
                    done_times.append(time.monotonic() - t0)
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    return

        masters = {"runtime-api": ours.haproxy_master_pid(),
                   "reload-per-change": base.haproxy_master_pid()}
        procs = {"runtime-api": ours.pid, "reload-per-change": base.pid}
        ticks0 = {m: cpu_ticks(procs[m]) for m in procs}
        sampler = ProcSampler(masters, app_ports)
        sampler.start()
        stack.callback(sampler.stop)
        hostload = HostLoad().start()
        others = other_containers(run.client)
        started_at = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True, name=f"churn-{i}")
                   for i in range(args.churn_parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.churn_timeout)
        churn_s = time.monotonic() - started_at
        host = hostload.read()
        time.sleep(max(1.0, grace + 0.5))  # the last stopped instances drain and exit
        for d in (wrk_a, wrk_b):
            d.stop(signal.SIGINT, timeout=10)
        ticks = {m: cpu_ticks(procs[m]) - ticks0[m] for m in procs}
        sampler.stop()
        if errors:
            raise Unmeasured(f"churn: {errors[0]!r}")
        if any(t.is_alive() for t in threads):
            raise Unmeasured(f"churn: replacements not done within {args.churn_timeout} s")
        res = {"runtime-api": wrk_result(wrk_a), "reload-per-change": wrk_result(wrk_b)}
        reloads = {"runtime-api": (ours.reload_count() or 0) - reloads_before[0],
                   "reload-per-change": (base.reload_count() or 0) - reloads_before[1]}
        old_at_end = {"runtime-api": ours.old_workers(), "reload-per-change": base.old_workers()}
        base.stop()  # writes its stats file
        base_stats: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            base_stats = json.loads(base.stats_path.read_text())
        changes = 2 * args.replacements  # a put and a delete per replacement
        common = {"load_kind": load, "replacements": args.replacements,
                  "parallel": args.churn_parallel, "pool": args.churn_pool,
                  "idle_conns": args.idle_conns, "idle_every_s": args.idle_every,
                  "idle_conns_at_end": [len(c.socks) for c in idle],
                  "idle_conns_failed": [c.failed for c in idle],
                  "churn_seconds": round(churn_s, 1),
                  "replacement_p50_s": _r(percentile(done_times, 0.5)),
                  "other_containers": others, **host, "app_grace_s": grace,
                  "accept_queues": sampler.accept_queue,
                  "load": f"wrk -t1 -c{args.wrk_conns}, "
                          f"{'Connection: close' if close else 'keep-alive'}, "
                          f"{args.wrk_delay_ms} ms pause per request"}
        for mode in ("runtime-api", "reload-per-change"):
            r = res[mode]
            unanswered = max(0, int(r["sent"]) - int(r["answered"]))
            # wrk is stopped with requests in flight: up to one per connection is unanswered
            lost = max(0, unanswered - args.wrk_conns)
            failed = lost + int(r["bad_status"])
            requests = int(r["requests"])
            row: dict[str, Any] = {
                "name": "churn_failed_requests", "backend": backend, "mode": mode,
                "n": requests, "failed": failed, "lost": lost, "unanswered": unanswered,
                "bad_status": int(r["bad_status"]), "sent": int(r["sent"]),
                "wrk_errors": {k: r[k] for k in ("connect", "read", "write", "status",
                                                 "timeout")},
                "p50_ms": _r(r["p50_us"] / 1000), "p99_ms": _r(r["p99_us"] / 1000),
                "max_ms": _r(r["max_us"] / 1000),
                "percentiles_ms": {k: _r(v / 1000) for k, v in r["percentiles_us"].items()},
                "rate_per_s": round(requests / max(r["duration_us"] / 1e6, 1e-9)),
                "haproxy_reloads": reloads[mode], "old_workers_at_end": old_at_end[mode],
                "old_workers_peak": sampler.peak_old.get(mode),
                "old_workers_peak_rss_mib": round(sampler.peak_old_rss_kib.get(mode, 0) / 1024,
                                                  1),
                "haproxy_peak_rss_mib": round(sampler.peak_rss_kib.get(mode, 0) / 1024, 1),
                "cpu_s": round(ticks[mode] / CLK_TCK, 2),
                "cpu_ms_per_change": round(ticks[mode] / CLK_TCK * 1000 / changes, 1),
                "target": f"0 failed of >= {TARGET_CHURN_MIN_REQUESTS}",
                "pass": failed == 0 and requests >= TARGET_CHURN_MIN_REQUESTS, **common}
            if mode == "reload-per-change":
                row["baseline_tuning"] = base_stats.get("tuning")
                row["baseline_changes"] = base_stats.get("changes")
                row["baseline_passes"] = base_stats.get("passes")
                pass_ms = base_stats.get("pass_ms") or []
                row["baseline_render_to_reloaded_p50_ms"] = _r(percentile(pass_ms, 0.5))
                row["baseline_render_to_reloaded_p99_ms"] = _r(percentile(pass_ms, 0.99))
                row["pass"] = None  # the baseline is a comparison, not held to the target
            report.emit(row)
        report.save(f"churn-{load}", backend, mark, {
            "replacement_s": [round(v, 3) for v in done_times],
            "baseline_pass_ms": base_stats.get("pass_ms"),
            "baseline_reload_ms": base_stats.get("reload_ms"),
            "wrk": res})
