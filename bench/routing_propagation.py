"""``bench/routing.py``'s propagation phase: add and drain latency, Docker → agent → registry →
watcher → HAProxy, split into the agent's and the watcher's parts (the module docstring of
``routing.py`` says how it is measured).
"""


from __future__ import annotations

import contextlib
import json
import time
from functools import partial

import docker.errors  # binds ``docker`` too
from common import Unmeasured, _r, default_wait, percentile, say
from procs import Daemon, HostLoad, Routed, discovery_cmd, http_get, wait_until
from routing_rig import (
    Containers,
    DockerEvents,
    Poller,
    RegistryLog,
    Run,
    app_labels,
    other_containers,
)

from tests.harness.dockerd import app_healthcheck
from tests.harness.servers import ServerCluster
from tests.harness.util import free_port

TARGET_ADD_P99_MS = 250.0
TARGET_DRAIN_P99_MS = 100.0


def splits(agent: list[float], watcher: list[float]) -> dict[str, float | None]:
    """A figure's agent (Docker → registry) and watcher (registry → HAProxy) parts, p50 / p99."""
    return {f"split_{part}_{name}_ms": _r(percentile(values, q))
            for part, values in (("agent", agent), ("watcher", watcher))
            for name, q in (("p50", 0.5), ("p99", 0.99))}


def run_propagation(run: Run, backend: str, server: ServerCluster) -> None:
    args, report = run.args, run.report
    assert run.client is not None
    url = server.url(f"/bench-routing-{run.token}-{backend}")
    svc = run.service
    grace = float(args.grace)
    with contextlib.ExitStack() as stack:
        agent = Daemon(discovery_cmd("agent", "--registry", url, "--node", f"rt-{backend}"),
                       run.work / f"agent-{backend}.log").start()
        stack.callback(agent.stop)
        port = free_port()
        watcher = Routed.watcher(url, {svc: port}, run.work,
                                 log_level=args.watcher_log_level).start()
        stack.callback(watcher.close)
        watcher.wait_ready([port])
        reglog = RegistryLog(url)
        stack.callback(reglog.close)
        events = DockerEvents(run.client)
        stack.callback(events.close)
        containers = Containers(run.client, run.image)
        stack.callback(containers.close)

        anchor_port = free_port()
        anchor = f"rt-{backend}-anchor-{run.token}"
        containers.start(anchor, anchor_port, app_labels(svc, anchor_port, check="tcp"),
                         grace=grace)
        wait_until(lambda: http_get(port) == (200, anchor), 60, f"{anchor} served on :{port}")
        poller = Poller(port, pause=args.poll_pause).start()
        stack.callback(poller.stop)

        add: list[float] = []
        drain: list[float] = []
        add_agent: list[float] = []
        add_watcher: list[float] = []
        drain_agent: list[float] = []
        drain_watcher: list[float] = []
        problems: list[str] = []
        trace = (run.work / f"events-{backend}.jsonl").open("a")
        stack.callback(trace.close)
        hc = app_healthcheck(interval=args.health_interval, timeout=1.0, retries=2)
        say(f"{backend}: propagation, {args.events} containers one after another")
        mark = report.mark()
        load = HostLoad().start()
        others = other_containers(run.client)
        started = time.monotonic()
        for i in range(args.events):
            name = f"rt-{backend}-{i}-{run.token}"
            cport = free_port()
            try:
                cid = containers.start(name, cport, app_labels(svc, cport), grace=grace,
                                       healthcheck=hc)
            except docker.errors.APIError as exc:
                problems.append(f"{name}: {exc}")
                continue
            healthy_ns = events.wait(events.healthy, cid, 20.0)
            try:
                first_ns = wait_until(partial(poller.first.get, name), 15.0,
                                      f"{name} served", interval=0.002)
            except Unmeasured as exc:
                problems.append(str(exc))
                containers.stop_signal(cid, grace + 1)
                continue
            put_ns = reglog.put.get(cid[:12])
            if healthy_ns is None:
                problems.append(f"{name}: no health_status: healthy event")
            else:
                add.append((first_ns - healthy_ns) / 1e6)
                if put_ns is not None:
                    add_agent.append((put_ns - healthy_ns) / 1e6)
                    add_watcher.append((first_ns - put_ns) / 1e6)
            containers.stop_signal(cid, grace + 1.0)
            kill_ns = events.wait(events.killed, cid, 10.0)
            times = {"name": name, "cid": cid[:12], "healthy": healthy_ns, "put": put_ns,
                     "first": first_ns, "kill": kill_ns}
            try:
                wait_until(partial(poller.drained, name, args.drained_after),
                           grace, f"{name} drained", interval=0.002)
            except Unmeasured as exc:
                problems.append(str(exc))
                continue
            last_ns = poller.last[name][0]
            times |= {"deleted": reglog.deleted.get(cid[:12]), "last": last_ns}
            trace.write(json.dumps(times) + "\n")
            if kill_ns is None:
                problems.append(f"{name}: no kill event")
                continue
            if last_ns - kill_ns >= (grace - 0.2) * 1e9:
                problems.append(f"{name}: still served at the end of its grace period")
                continue
            drain.append((last_ns - kill_ns) / 1e6)
            del_ns = reglog.deleted.get(cid[:12])
            if del_ns is not None:
                drain_agent.append((del_ns - kill_ns) / 1e6)
                drain_watcher.append((last_ns - del_ns) / 1e6)
        elapsed = time.monotonic() - started
        polls = poller.seq
        poller.stop()
        common = {"poll_requests": polls, "poll_rate_per_s": round(polls / elapsed),
                  "poll_errors": poller.errors, "poll_non200": poller.non200,
                  "poll_period_ms": round(elapsed * 1000 / max(polls, 1), 2),
                  "unhealthy_events": events.unhealthy, "watcher_reloads": watcher.reload_count(),
                  "watcher_wait": default_wait(), "other_containers": others,
                  **load.read(), "problems": problems[:5]}
        report.latency("healthy_to_served", backend, add, expected=args.events,
                       target_ms=TARGET_ADD_P99_MS, **splits(add_agent, add_watcher), **common)
        report.latency("kill_to_last_served", backend, drain, expected=args.events,
                       target_ms=TARGET_DRAIN_P99_MS, **splits(drain_agent, drain_watcher),
                       **common)
        report.save("propagation", backend, mark, {
            "healthy_to_served_ms": add, "kill_to_last_served_ms": drain,
            "add_agent_ms": add_agent, "add_watcher_ms": add_watcher,
            "drain_agent_ms": drain_agent, "drain_watcher_ms": drain_watcher})
