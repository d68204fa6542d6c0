"""``bench/faults.py``'s faults: each injects one fault into the rig and says when it healed;
:data:`FAULTS` names them, with what each may cost.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker.errors  # binds ``docker`` too
from common import Unmeasured
from faults_rig import Fault, Rig, now, sleep_until
from procs import children_of, wait_until

from discovery.registry import RegistryURL
from tests.harness.dockerd import SESSION_ID, TEST_LABEL
from tests.harness.tcp_proxy import TcpProxy

REGISTRY_BACK_WITHIN_S = 2.0  # partition / session expiry: instances back within 2 s of the link
#: whole cluster down: the container started meanwhile is registered within this of the
#: restart: the members' start and election (~1 s), a ZooKeeper host's reconnect within the
#: resume spread (3 s), and a margin (a reconcile spread over a resync period would miss it)
CLUSTER_BACK_WITHIN_S = 8.0

# --------------------------------------------------------------------------- the faults


def f_leader_kill(rig: Rig) -> Fault:
    """SIGKILL the cluster's leader; start it again ``--leader-down`` s later."""
    c = rig.cluster
    leader = c.wait_leader(30)
    t0 = now()
    c.kill_member(leader)
    new = c.wait_leader(30)
    elected = now() - t0
    sleep_until(t0 + rig.args.leader_down)
    c.start_member(leader, wait=False)
    t_heal = now()
    c.wait_ready()
    return Fault(t0, t_heal, {"killed_member": leader, "new_leader": new,
                              "new_leader_after_s": round(elected, 2),
                              "down_s": rig.args.leader_down})


def f_cluster_down(rig: Rig) -> Fault:
    """SIGKILL every member; start a container meanwhile; start them all ``--outage`` s later."""
    c = rig.cluster
    t0 = now()
    for p in c.procs:  # all at once
        p.signal(signal.SIGKILL)
    for i in range(c.size):
        c.kill_member(i)  # reaps it
    name = rig.add_container("-outage")
    sleep_until(t0 + rig.args.outage)
    for i in range(c.size):
        c.start_member(i, wait=False)
    t_heal = now()
    c.wait_ready()
    return Fault(t0, t_heal, {"down_s": rig.args.outage, "started_meanwhile": name,
                              "cluster_serving_after_s": round(now() - t_heal, 2)})


def _agent_links(rig: Rig, how: Callable[[TcpProxy], contextlib.AbstractContextManager[None]],
                 window: float, what: str, start_one: bool = False) -> Fault:
    """Every link of the agent (to each member) stalled or refused for ``window`` s; with
    ``start_one``, a container is started 1 s into it (its registration waits for the link)."""
    t0 = now()
    notes: dict[str, Any] = {"cut_s": window, "how": what}
    with contextlib.ExitStack() as stack:
        for p in rig.agent_proxies:
            stack.enter_context(how(p))
        if start_one:
            sleep_until(t0 + 1.0)
            notes["started_meanwhile"] = rig.add_container("-cut")
        sleep_until(t0 + window)
    return Fault(t0, now(), notes)


def f_agent_partition(rig: Rig) -> Fault:
    """The agent's links to every member stall (no reset: a partition) for TTL + 3 s; a
    container is started meanwhile."""
    return _agent_links(rig, TcpProxy.stalled, rig.args.ttl + 3.0, "stalled links (no reset)",
                        start_one=True)


def f_session_expiry(rig: Rig) -> Fault:
    """ZooKeeper: the agent's links refuse connections for the session timeout + 2 s, so the
    ensemble expires its session; it comes back to an expired session."""
    return _agent_links(rig, TcpProxy.blocked, rig.args.ttl + 2.0, "links refused (reset)")


def f_registry_latency(rig: Rig) -> Fault:
    """Every registry link (agent's and watcher's) delayed ``--latency-ms`` per round trip
    for ``--latency-seconds``; meanwhile one instance is added and one retired."""
    args = rig.args
    proxies = [*rig.agent_proxies, *rig.watcher_proxies]
    t0 = now()
    for p in proxies:
        p.delay = args.latency_ms / 2000.0  # each way
    try:
        timings, _ = _add_and_retire(rig, "-slow", 30.0)
        sleep_until(t0 + args.latency_seconds)
    finally:
        for p in proxies:
            p.delay = 0.0
    return Fault(t0, now(), {"latency_ms": args.latency_ms, "window_s": args.latency_seconds,
                             **timings})


def _add_and_retire(rig: Rig, tag: str, timeout: float, required: bool = True
                    ) -> tuple[dict[str, Any], float | None]:
    """Add one instance and wait until it is served (``timeout`` s at most; not
    ``required``: then retired all the same, its row saying it was not served: the fault's
    measure tells whether it is routed after the heal), then retire the oldest and wait until
    it is no longer served (or its grace ran out): how long each took, and when it was served
    (None: not within ``timeout``)."""
    t_add = now()
    name = rig.add_container(tag)
    served: float | None = None
    try:
        served = wait_until(lambda: rig.load.last_seen.get(name), timeout, f"{name} served",
                            interval=0.02)
    except Unmeasured:
        if required:
            raise
    oldest = next(iter(rig.expected))
    t_retire = now()
    rig.retire_container(oldest)
    grace = rig.args.grace
    wait_until(lambda: now() - rig.load.last_seen.get(oldest, 0.0) > 0.5
               or now() - t_retire > grace + 1, grace + 5, f"{oldest} drained", interval=0.05)
    last = rig.load.last_seen.get(oldest, t_retire)
    return {"added_started_to_served_s": None if served is None else round(served - t_add, 2),
            "retired_term_to_last_served_s": round(last - t_retire, 2)}, served


def _in_use(proxies: list[TcpProxy]) -> int | None:
    """The member whose proxy carries the most connections now (None: none carries any)."""
    counts = [p.connections() for p in proxies]
    return counts.index(max(counts)) if max(counts) else None


def _stall(rig: Rig, leader_too: bool) -> Fault:
    """SIGSTOP the member the watcher's registry client uses (its watch stream), or
    (``leader_too``) the leader (it takes connections and answers nothing, as in a long
    fsync or GC pause) for ``--stall`` s, longer than a request's timeout; one instance is
    added and one retired 1 s into it; SIGCONT."""
    args, c = rig.args, rig.cluster
    leader, agent_member = c.wait_leader(30), _in_use(rig.agent_proxies)
    watcher_member = _in_use(rig.watcher_proxies)
    member = leader if leader_too else watcher_member
    if member is None:
        raise Unmeasured("no connection from the watcher to any member")
    popen = c.procs[member].popen
    if popen is None:
        raise Unmeasured(f"member {member} is not running")
    pid = popen.pid
    t0 = now()
    os.kill(pid, signal.SIGSTOP)
    try:
        sleep_until(t0 + 1.0)
        timings, served = _add_and_retire(rig, "-stall", args.stall - 1.0, required=False)
        sleep_until(t0 + args.stall)
    finally:
        os.kill(pid, signal.SIGCONT)
    t_heal = now()
    c.wait_ready()
    return Fault(t0, t_heal, {"stalled_member": member, "was_leader": member == leader,
                              "agent_on_it": agent_member == member,
                              "watcher_on_it": watcher_member == member, "stall_s": args.stall,
                              "served_before_heal": served is not None, **timings})


def f_member_stall(rig: Rig) -> Fault:
    return _stall(rig, leader_too=False)


def f_leader_stall(rig: Rig) -> Fault:
    return _stall(rig, leader_too=True)


def f_agent_kill(rig: Rig) -> Fault:
    """SIGKILL the agent; start the same command ``--agent-down`` s later (within the TTL)."""
    t0 = now()
    rig.agent.stop(signal.SIGKILL)
    sleep_until(t0 + rig.args.agent_down)
    rig.agent.start()
    return Fault(t0, now(), {"down_s": rig.args.agent_down})


def f_watcher_kill(rig: Rig) -> Fault:
    """SIGKILL the watcher (its HAProxy runs on); start the same command at once."""
    old = rig.watcher.haproxy_master_pid()
    t0 = now()
    rig.watcher.stop(signal.SIGKILL)
    rig.watcher.start()
    return Fault(t0, now(), {"haproxy_master_before": old})  # adopted: the same at the end


def f_watcher_upgrade(rig: Rig) -> Fault:
    """Stop the watcher with ``--upgrade-signal`` (the handover signal, once there is one),
    wait for it to exit, start the new one (the same command)."""
    sig = signal.Signals[f"SIG{rig.args.upgrade_signal.upper().removeprefix('SIG')}"]
    old = rig.watcher.haproxy_master_pid()
    t0 = now()
    code = rig.watcher.stop(sig, timeout=30.0)
    exited = now() - t0
    rig.watcher.start()
    return Fault(t0, now(), {"signal": sig.name, "old_exit_code": code,
                             "old_exited_after_s": round(exited, 2),
                             "haproxy_master_before": old})


def f_haproxy_worker_kill(rig: Rig) -> Fault:
    """SIGKILL the HAProxy worker (the master's newest child)."""
    master = rig.watcher.haproxy_master_pid()
    workers = sorted(children_of(master)) if master else []
    if not workers:
        raise Unmeasured(f"no HAProxy worker under master {master}")
    t0 = now()
    os.kill(workers[-1], signal.SIGKILL)
    return Fault(t0, t0, {"worker": workers[-1], "haproxy_master_before": master,
                          "haproxy_master_after": rig.watcher.haproxy_master_pid()})


def f_lease_revoke(rig: Rig) -> Fault:
    """etcd: revoke the agent's lease on the cluster, as a stuck leader does (etcd #15247)."""
    import pyetcd

    host, port = rig.cluster.address(0)
    client = pyetcd.client(host, port, timeout=5)
    try:
        prefix = RegistryURL.parse(rig.cluster.url(rig.prefix)).prefix
        leases = {kv.lease for kv in client.get_prefix_response(prefix).kvs if kv.lease}
        t0 = now()
        for lease in leases:
            client.revoke_lease(lease)
    finally:
        client.close()
    return Fault(t0, t0, {"leases_revoked": len(leases)})


def _dockerd_restart(rig: Rig, live_restore: bool) -> Fault:
    """Restart dockerd with its own flags (it disrupts every other session's containers:
    ``--include-dockerd``). Without live-restore dockerd stops the containers; the bench
    starts them again once it is back, as a restart policy or an operator would. With it,
    live-restore is turned on *before* the measured restart without stopping anything
    (``daemon.json`` + SIGHUP, unmeasured) and turned off the same way after, even on
    failure: dockerd is left exactly as it was."""
    from tests.harness import docker_daemon as hd

    try:
        with contextlib.ExitStack() as stack:
            if live_restore:
                stack.enter_context(hd.live_restore())
            elif hd.live_restore_enabled():
                raise Unmeasured("dockerd runs with live-restore: no restart without it")
            t0 = now()
            hd.restart_dockerd(timeout=120.0)  # the old daemon's own command line
            back = now() - t0
            enabled = hd.live_restore_enabled()
    except AssertionError as exc:  # a harness wait that timed out
        raise Unmeasured(str(exc)) from exc
    if enabled != live_restore:
        raise Unmeasured(f"dockerd came back with live-restore {enabled}, not {live_restore}")
    running = {c.id for c in rig.client.containers.list(
        filters={"label": f"{TEST_LABEL}={SESSION_ID}"})}
    still = sum(cid in running for cid in rig.expected.values())
    restarted = 0
    for cid in rig.expected.values():
        if cid not in running:
            with contextlib.suppress(docker.errors.APIError):
                rig.client.api.start(cid)
                restarted += 1
    return Fault(t0, now(), {"live_restore": live_restore,
                             "dockerd_back_after_s": round(back, 2),
                             "containers_still_running": still,
                             "containers_started_again": restarted})


def f_dockerd_restart(rig: Rig) -> Fault:
    return _dockerd_restart(rig, live_restore=False)


def f_dockerd_restart_live(rig: Rig) -> Fault:
    return _dockerd_restart(rig, live_restore=True)


@dataclass(frozen=True)
class Spec:
    what: str
    run: Callable[[Rig], Fault]
    backends: tuple[str, ...] = ("etcd", "zk")
    max_failed: int | None = 0  # None: failures expected, not a target
    registry_back_within: float | None = None


FAULTS: dict[str, Spec] = {
    "registry-latency": Spec("registry latency +200 ms (one add, one removal meanwhile)",
                             f_registry_latency),
    "agent-kill": Spec("agent SIGKILL + restart", f_agent_kill),
    "watcher-kill": Spec("watcher SIGKILL + restart", f_watcher_kill),
    "watcher-upgrade": Spec("watcher upgrade (stop, start the new one)", f_watcher_upgrade),
    "haproxy-worker-kill": Spec("HAProxy worker SIGKILL", f_haproxy_worker_kill,
                                max_failed=None),
    "lease-revoke": Spec("the agent's lease revoked", f_lease_revoke, backends=("etcd",)),
    "leader-kill": Spec("leader SIGKILL, back after 6 s", f_leader_kill),
    "member-stall": Spec("the watcher's member stalled (SIGSTOP) 20 s, one instance added "
                         "and one retired meanwhile", f_member_stall),
    "leader-stall": Spec("the leader stalled (SIGSTOP) 20 s, one instance added and one "
                         "retired meanwhile", f_leader_stall),
    "session-expiry": Spec("the agent's session expired", f_session_expiry, backends=("zk",),
                           registry_back_within=REGISTRY_BACK_WITHIN_S),
    "agent-partition": Spec("agent cut off from the registry for TTL + 3 s, a container "
                            "started meanwhile",
                            f_agent_partition, registry_back_within=REGISTRY_BACK_WITHIN_S),
    "cluster-down": Spec("whole cluster down 15 s, a container started meanwhile",
                         f_cluster_down, registry_back_within=CLUSTER_BACK_WITHIN_S),
    # without live-restore dockerd itself stops the apps: requests fail until they are
    # started again, whatever discovery does (no 0-failure target; nothing may be lost)
    "dockerd-restart": Spec("dockerd restart (no live-restore)", f_dockerd_restart,
                            max_failed=None),
    "dockerd-restart-live-restore": Spec("dockerd restart with live-restore",
                                         f_dockerd_restart_live),
}
DOCKERD_FAULTS = ("dockerd-restart", "dockerd-restart-live-restore")
