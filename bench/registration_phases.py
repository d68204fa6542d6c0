"""``bench/registration.py``'s two phases on one backend: **latency** (Docker health and kill
events → registry) and **idle** (the agent's RSS and CPU with containers it checks itself).
"""


from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from common import CLK_TCK, percentile, say
from procs import HostLoad
from registration_rig import (
    Agent,
    Containers,
    Recorder,
    agent_write_times,
    docker_retry,
    first_at_or_after,
    ms,
)

from tests.harness.dockerd import app_healthcheck

TARGET_P99_MS = 100.0
TARGET_RSS_MIB = 60.0


# --------------------------------------------------------------------------- one backend


def latency_metric(backend: str, metric: str, values_ms: list[float], expected: int,
                   **extra: Any) -> dict[str, Any]:
    n = len(values_ms)
    p99 = percentile(values_ms, 0.99)
    ok = n == expected and n > 0 and p99 <= TARGET_P99_MS
    return {
        "backend": backend, "metric": metric, "n": n, "expected": expected,
        "p50_ms": round(percentile(values_ms, 0.50), 2), "p99_ms": round(p99, 2),
        "max_ms": round(max(values_ms), 2) if values_ms else math.nan,
        "min_ms": round(min(values_ms), 2) if values_ms else math.nan,
        "target": f"p99 <= {TARGET_P99_MS:g} ms", "pass": ok, **extra,
    }


def split_stats(values_ns: list[int]) -> dict[str, float]:
    vals = ms(values_ns)
    if not vals:
        return {}
    return {"p50_ms": round(percentile(vals, 0.5), 1), "p99_ms": round(percentile(vals, 0.99), 1),
            "max_ms": round(max(vals), 1)}


@dataclass
class Options:
    backends: list[str]
    containers: int
    idle_containers: int
    idle_seconds: float
    idle_settle: float
    idle_check: str
    idle_health_interval: float
    health_interval: float
    kill_gap: float
    stop_with: str
    parallel: int
    timeout: float
    agent_log_level: str
    agent_args: list[str]
    py_spy: str | None
    work: Path
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)


def start_py_spy(opts: Options, agent: Agent, name: str,
                 rate: int) -> subprocess.Popen[bytes] | None:
    """With ``--py-spy``: sample the agent (all threads, folded stacks) until stop_py_spy."""
    if not opts.py_spy:
        return None
    folded = opts.work / f"{name}.folded"
    spy = subprocess.Popen(
        [opts.py_spy, "record", "--pid", str(agent.pid), "--rate", str(rate), "--nonblocking",
         "--threads", "--format", "raw", "--output", str(folded)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    say(f"py-spy (pid {spy.pid}) samples the agent into {folded}")
    time.sleep(0.5)  # attached before anything happens
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


def run_latency(backend: str, opts: Options, svc: str, containers: Containers, agent: Agent,
                rec: Recorder, emit: Callable[[dict[str, Any]], None]) -> None:
    n = opts.containers
    say(f"{backend}: latency phase: starting {n} containers ({opts.parallel} at a time, "
        f"HEALTHCHECK every {opts.health_interval:g}s: the first probe comes that long after "
        f"the start)")
    spy = start_py_spy(opts, agent, f"latency-{backend}", rate=1000)
    cpu_up = HostLoad().start()
    t0 = time.monotonic()
    ids = containers.start(
        [f"bench-{backend}-lat-{i}" for i in range(n)],
        lambda port: {"discovery.service": svc, "discovery.port": str(port)},
        app_healthcheck(interval=opts.health_interval))
    cids = [c[:12] for c in ids]
    say(f"{backend}: {n} started in {time.monotonic() - t0:.1f}s; waiting for all registered")
    if not rec.wait(lambda: rec.count_live(svc) >= n, opts.timeout + opts.health_interval):
        say(f"{backend}: only {rec.count_live(svc)}/{n} registered within the timeout")
    rec.check_docker()
    up_busy = cpu_up.read()["host_cpu_busy_pct"]
    say(f"{backend}: {rec.count_live(svc)}/{n} registered "
        f"({time.monotonic() - t0:.1f}s after the first start); `docker {opts.stop_with}` "
        f"them one by one, "
        f"{opts.kill_gap * 1000:g} ms apart")
    time.sleep(1.0)  # let the last registrations' watch traffic settle
    cpu_down = HostLoad().start()
    api = containers.client().api
    for cid in ids:
        end = (functools.partial(api.kill, cid) if opts.stop_with == "kill"
               else functools.partial(api.stop, cid, timeout=10))
        with contextlib.suppress(docker.errors.NotFound):
            docker_retry(f"docker {opts.stop_with}", end)
        time.sleep(opts.kill_gap)
    if not rec.wait(lambda: rec.count_live(svc) == 0, opts.timeout):
        say(f"{backend}: {rec.count_live(svc)} still registered after the timeout")
    time.sleep(0.5)  # late kill events from the stream
    down_busy = cpu_down.read()["host_cpu_busy_pct"]
    stop_py_spy(spy)
    rec.check_docker()

    snap = rec.copy(cids)
    logged = agent_write_times(agent.log(), svc)
    up_ns, up_agent, up_watch = [], [], []
    down_ns, down_agent, down_watch = [], [], []
    not_registered_at_kill = 0
    up_docker = [t.healthy_seen - t.healthy for t in snap.values()
                 if t.healthy is not None and t.healthy_seen is not None]
    down_docker = [t.kill_seen - t.kill for t in snap.values()
                   if t.kill is not None and t.kill_seen is not None]
    for c, t in snap.items():
        lg = logged.get(c, {})
        put = t.first_put()
        if t.healthy is not None and put is not None:
            up_ns.append(put - t.healthy)
            reg = first_at_or_after(lg.get("registered", []), t.healthy)
            if reg is not None:
                up_agent.append(reg - t.healthy)
                up_watch.append(put - reg)
        if t.kill is None:
            continue
        if not t.registered_at(t.kill):
            not_registered_at_kill += 1
            continue
        gone = t.first_delete_after(t.kill)
        if gone is not None:
            down_ns.append(gone - t.kill)
            dereg = first_at_or_after(lg.get("deregistered", []), t.kill)
            if dereg is not None:
                down_agent.append(dereg - t.kill)
                down_watch.append(gone - dereg)
    flaps = sum(t.unhealthy for t in snap.values())
    notes = {"unhealthy_events": flaps, "watch_resets": rec.resets,
             "docker_events_ended": rec.events_ended}
    opts.samples.setdefault(backend, {}).update({
        "healthy_to_registered_ms": [round(v, 3) for v in ms(up_ns)],
        "kill_to_removed_ms": [round(v, 3) for v in ms(down_ns)],
        "split_event_to_agent_log_up_ms": ms(up_agent),
        "split_agent_log_to_watch_up_ms": ms(up_watch),
        "split_event_to_agent_log_down_ms": ms(down_agent),
        "split_agent_log_to_watch_down_ms": ms(down_watch)})
    emit(latency_metric(
        backend, "healthy_to_registered", ms(up_ns), n, host_cpu_busy_pct=up_busy,
        health_interval_s=opts.health_interval,
        docker_event_delivery_to_bench=split_stats(up_docker),
        split_event_to_agent_log=split_stats(up_agent),
        split_agent_log_to_watch=split_stats(up_watch), **notes))
    emit(latency_metric(
        backend, "kill_to_removed", ms(down_ns), n, host_cpu_busy_pct=down_busy,
        kill_gap_s=opts.kill_gap, stopped_with=opts.stop_with,
        not_registered_at_kill=not_registered_at_kill,
        docker_event_delivery_to_bench=split_stats(down_docker),
        split_event_to_agent_log=split_stats(down_agent),
        split_agent_log_to_watch=split_stats(down_watch), **notes))
    say(f"{backend}: removing the {n} killed containers")
    containers.remove(ids)


def run_idle(backend: str, opts: Options, svc: str, containers: Containers, agent: Agent,
             rec: Recorder, emit: Callable[[dict[str, Any]], None], base_rss_kib: int) -> None:
    n = opts.idle_containers
    if opts.idle_check == "tcp":
        def labels(port: int) -> dict[str, str]:
            return {"discovery.service": svc, "discovery.port": str(port),
                    "discovery.check": "tcp"}
        healthcheck = None
        check = "tcp (agent-side, default interval 2s)"
    else:
        def labels(port: int) -> dict[str, str]:
            return {"discovery.service": svc, "discovery.port": str(port)}
        healthcheck = app_healthcheck(interval=opts.idle_health_interval)
        check = f"docker HEALTHCHECK every {opts.idle_health_interval:g}s"
    say(f"{backend}: idle phase: starting {n} containers, check {check}")
    t0 = time.monotonic()
    containers.start([f"bench-{backend}-idle-{i}" for i in range(n)], labels, healthcheck)
    say(f"{backend}: {n} started in {time.monotonic() - t0:.1f}s; waiting for all registered")
    if not rec.wait(lambda: rec.count_live(svc) >= n,
                    opts.timeout + (opts.idle_health_interval if healthcheck else 0)):
        say(f"{backend}: only {rec.count_live(svc)}/{n} registered within the timeout")
    rec.check_docker()
    registered = rec.count_live(svc)
    say(f"{backend}: {registered}/{n} registered; settling {opts.idle_settle:g}s, then "
        f"measuring {opts.idle_seconds:g}s")
    time.sleep(opts.idle_settle)
    spy = start_py_spy(opts, agent, f"idle-{backend}", rate=200)
    host = HostLoad().start()
    first = agent.proc_sample()
    w0 = time.monotonic()
    rss_max = first["VmRSS"]
    while time.monotonic() - w0 < opts.idle_seconds:
        time.sleep(min(1.0, max(0.0, opts.idle_seconds - (time.monotonic() - w0))))
        rss_max = max(rss_max, agent.proc_sample()["VmRSS"])
    last = agent.proc_sample()
    wall = time.monotonic() - w0
    stop_py_spy(spy)
    rec.check_docker()
    still = rec.count_live(svc)
    cpu_pct = 100.0 * (last["ticks"] - first["ticks"]) / CLK_TCK / wall
    rss_kib = max(rss_max, last["VmRSS"])
    rss_mib = rss_kib / 1024
    common = {"backend": backend, "n": registered, "expected": n, "check": check,
              "window_s": round(wall, 1), "still_registered": still,
              "host_cpu_busy_pct": host.read()["host_cpu_busy_pct"], "threads": last["Threads"]}
    emit({**common, "metric": "agent_rss", "rss_mib": round(rss_mib, 1),
          "rss_mb": round(rss_kib * 1024 / 1e6, 1),
          "rss_empty_mib": round(base_rss_kib / 1024, 1),
          "rss_anon_mib": round(last.get("RssAnon", 0) / 1024, 1),
          "rss_file_mib": round(last.get("RssFile", 0) / 1024, 1),
          "pss_mib": round(last.get("Pss", 0) / 1024, 1),
          "hwm_mib": round(last["VmHWM"] / 1024, 1),
          "target": f"<= {TARGET_RSS_MIB:g} MiB",
          "pass": registered == n and still == n and rss_mib <= TARGET_RSS_MIB})
    emit({**common, "metric": "agent_idle_cpu", "cpu_pct_of_one_core": round(cpu_pct, 2),
          "target": None, "pass": None})
