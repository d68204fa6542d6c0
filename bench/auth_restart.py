#!/usr/bin/env python3
"""A full etcd restart under a fleet that logs in with a password: what each kind of token
costs, side by side in one run.

etcd checks a password with bcrypt (``--bcrypt-cost``, 10 by default: ~62 ms of a member's
CPU a login, measured here). A *simple* token lives in the members' memory only: a restart
forgets every token issued before the members' last raft snapshot (in a cluster that has run
for a while: all of them), so every host logs in again at once. A *JWT* (``--auth-token jwt``)
is verified by its signature and outlives the restart.

Per mode of ``--modes`` (one after the other, each on a fresh 3-member cluster on loopback):
``--hosts`` (400) simulated hosts (``bench/fleet_host.Host``: the project's registry and
catalog, one instance each, each watching the whole registry on its own gRPC connection from
its own 127.20.x.y unless ``--shared-source``, all in this process), logged in as a user whose
role may read and write the prefix. Then 250 writes past the members' ``--snapshot-count``
(200), so that a raft snapshot follows every login; then every member SIGTERMed and started
again (by its pid). Once all serve, a new instance is registered: **resynced** is when each
host's catalog holds it (from the members serving again). Counted by the members (their
counters start at the restart): logins (``Authenticate``), calls refused for a token etcd no
longer takes (``Unauthenticated``), and the members' CPU until every host resynced.

Modes: ``none`` (no auth: the baseline), ``simple`` (simple tokens, bcrypt cost 10: etcd's
defaults), ``simple-cost4`` (simple tokens, ``--bcrypt-cost 4``), ``jwt`` (RS256 JWTs living
10 minutes, bcrypt cost 10). Target per mode, the fleet bench's: every host resynced within
10 s of the members serving.

Raw result: ``bench/results/auth-restart-etcd.json``. Every member is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLK_TCK,
    Report,
    measured,
    percentile,
    say,
)
from fleet_host import Host, from_own_source, install_etcd_host_channels, raise_nofile
from fleet_procs import connect_from_own, preload_source_addresses
from procs import cpu_ticks

from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.etcd_aio import LoopThread

MODES = {"none": (None, 10), "simple": ("simple", 10), "simple-cost4": ("simple", 4),
         "jwt": ("jwt", 10)}
SNAPSHOT_COUNT = 200
TARGET_S = 10.0


def cluster(mode: str, work: Path) -> Any:
    """A 3-member etcd for ``mode``, started; with auth: its user ``alice`` may read and write
    under ``/alice/``."""
    from tests.harness.secure import AuthEtcd, JwtEtcd
    from tests.harness.servers import EtcdCluster

    token, cost = MODES[mode]

    class FleetAuthEtcd(AuthEtcd):
        TOKEN_TTL = 300  # etcd's default: a host's token never idles out here

    if token is None:
        c = EtcdCluster(3, work, extra=("--snapshot-count", str(SNAPSHOT_COUNT)))
    else:
        c = JwtEtcd(3, work, jwt_ttl=600) if token == "jwt" else FleetAuthEtcd(3, work)
        for proc in c.procs:
            at = proc.argv.index("--bcrypt-cost")
            proc.argv[at + 1] = str(cost)
            proc.argv += ["--snapshot-count", str(SNAPSHOT_COUNT)]
    try:
        c.start()
    except BaseException:  # Ctrl-C, or a member that failed: none left running
        c.stop()
        raise
    return c


def serving(c: Any) -> bool:
    """Every member answers ``/health`` (it has a leader); asked without logging in."""
    try:
        for port in c.client_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.load(r).get("health") != "true":
                    return False
    except (OSError, ValueError):
        return False
    return True


def members_cpu(c: Any) -> float:
    return sum(cpu_ticks(p.popen.pid, tree=False) for p in c.procs) / CLK_TCK


def counted(c: Any, method: str = "", code: str = "") -> float:
    total = 0.0
    for i in range(len(c.procs)):
        counts = c.grpc_counts(i=i, code=code)
        total += counts.get(method, 0.0) if method else sum(counts.values())
    return total


def snapshot_after_logins(root_url: str) -> None:
    """Writes past the members' ``--snapshot-count``: a raft snapshot follows every login so
    far, so that a restart forgets their simple tokens (as a cluster that ran a while)."""
    root = open_registry(root_url, ttl=30.0, environ={})
    try:
        for k in range(SNAPSHOT_COUNT + 50):
            root.register(Instance(service="pad", id=f"pad:{k:012x}:1", node="pad",
                                   address="127.0.0.1", port=1))
    finally:
        root.close(revoke=False)


def full_restart(c: Any) -> tuple[float, float]:
    """Every member SIGTERMed at once and started again (by its pid); (monotonic, wall) time
    when all serve again."""
    stopped = time.monotonic()
    for proc in c.procs:
        proc.signal(signal.SIGTERM)
    for proc in c.procs:
        proc.stop(timeout=15)
    for proc in c.procs:
        proc.start()
    while not serving(c):
        if time.monotonic() - stopped > 60:
            raise RuntimeError("the members did not serve again within 60 s")
        time.sleep(0.05)
    return time.monotonic(), time.time()


def host_url(args: argparse.Namespace, c: Any, url: str, n: int) -> str:
    """Host ``n``'s registry URL: ``url``, or (unless ``--shared-source``) ``url`` from its own
    127.20.x.y (``fleet_procs.preload_source_addresses``: this process's connects to the
    members' ports are rewritten)."""
    if args.shared_source:
        return url
    connect_from_own(c.client_ports)
    return from_own_source(url, n)


def add_source_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shared-source", action="store_true",
                    help="every host connects from 127.0.0.1 (by default each from its own "
                         "127.20.x.y, bench/srcaddr.c preloaded in this process)")


def own_sources_unless_shared(args: argparse.Namespace) -> None:
    """Unless ``--shared-source``: this process started again with ``bench/srcaddr.c``
    preloaded (the first time; ``fleet_procs.preload_source_addresses``)."""
    if not args.shared_source:
        preload_source_addresses()


@contextmanager
def fleet_on(c: Any) -> Iterator[tuple[LoopThread, list[Host]]]:
    """The asyncio loop and the list (empty: the caller starts them) of a run's hosts on
    cluster ``c``; on the way out every host is closed, then the loop, then ``c`` stopped."""
    loop = LoopThread()
    hosts: list[Host] = []
    try:
        yield loop, hosts
    finally:
        for host in hosts:
            host.close(revoke=False)
        loop.close()
        c.stop()


def followed(hosts: Sequence[Host], root_url: str, since: tuple[float, float],
             wait: float) -> list[float]:
    """A new instance registered in ``svc000`` (by root): seconds from ``since`` (monotonic,
    wall) until each host's catalog held it, waiting up to ``wait`` s from ``since``."""
    probe = Instance(service="svc000", id="probe:000000000001:80", node="probe",
                     address="127.0.0.1", port=80)
    for host in hosts:
        host.arm = lambda cat: cat.get(probe.key) is not None
    root = open_registry(root_url, ttl=30.0, environ={})
    try:
        root.register(probe)
        for host in hosts:
            host.check_hit()
        while time.monotonic() - since[0] < wait and any(h.hit is None for h in hosts):
            time.sleep(0.1)
    finally:
        root.close(revoke=False)
    return [h.hit - since[1] for h in hosts if h.hit is not None]


def one_mode(mode: str, args: argparse.Namespace, work: Path, report: Report) -> list[float]:
    token, cost = MODES[mode]
    c = cluster(mode, work / mode)
    with fleet_on(c) as (loop, hosts):
        prefix = "/alice/fleet"
        url = (c.url_as(c.USER, c.USER_PASSWORD, prefix) if token else c.url(prefix))
        root_url = c.url_as("root", c.ROOT_PASSWORD, prefix) if token else c.url(prefix)
        host_args = argparse.Namespace(ttl=args.ttl, instances=1, services=10,
                                       watch_services=0, resync=30.0)
        began = time.monotonic()
        for n in range(args.hosts):
            host = Host(n, f"{host_url(args, c, url, n)}?spread=3", host_args, loop)
            host.start()
            hosts.append(host)
        started_s = time.monotonic() - began
        say(f"{mode}: {args.hosts} hosts started in {started_s:.1f} s")
        snapshot_after_logins(root_url)
        stopped = time.monotonic()
        served = full_restart(c)
        cpu0 = members_cpu(c)
        took = followed(hosts, root_url, served, args.wait)
        cpu = members_cpu(c) - cpu0
        logins = counted(c, "Authenticate") - 1  # the probe's writer logged in once
        refused = counted(c, code="Unauthenticated")
        worst = max(took) if len(took) == len(hosts) else None
        report.emit({
            "name": "auth_restart", "mode": mode, "token": token or "none",
            "bcrypt_cost": cost if token else None, "hosts": args.hosts,
            "hosts_started_s": round(started_s, 1),
            "members_serving_after_s": round(served[0] - stopped, 2),
            "resynced": len(took), "resynced_p50_s": round(percentile(took, 0.5), 2),
            "resynced_max_s": None if worst is None else round(worst, 2),
            "logins": round(logins) if token else 0,
            "unauthenticated": round(refused), "members_cpu_s": round(cpu, 1),
            "target": f"every host within {TARGET_S:g} s",
            "pass": worst is not None and worst <= TARGET_S})
        return [round(t, 3) for t in took]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=400)
    ap.add_argument("--modes", default="none,simple,simple-cost4,jwt")
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--wait", type=float, default=150.0, help="seconds to wait for resync")
    ap.add_argument("--no-save", action="store_true")
    add_source_option(ap)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not (1 <= args.hosts <= 1000 and set(modes) <= set(MODES) and 5 <= args.wait <= 600):
        ap.error(f"--hosts 1..1000, --modes of {','.join(MODES)}, --wait 5..600")
    own_sources_unless_shared(args)
    logging.basicConfig(level=logging.ERROR)  # hundreds of hosts' own "interrupted" lines
    raise_nofile()
    install_etcd_host_channels()

    def run(work: Path, report: Report) -> dict[str, list[float]]:
        return {mode: one_mode(mode, args, work, report) for mode in modes}

    return measured("auth-restart", "etcd", "auth restart", run, save=not args.no_save)

if __name__ == "__main__":
    sys.exit(main())
