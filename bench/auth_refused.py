#!/usr/bin/env python3
"""A fleet that etcd refuses at once: the hosts' password rotated in etcd, then a full restart.
What the fleet costs etcd while it is refused, and how soon it follows again once the password
is fixed, side by side in one run: the refusal backoff and the resume rate it replaced.

etcd checks a password with bcrypt (``--bcrypt-cost`` 10 by default: ~62 ms of a member's CPU
a login, ``bench/auth_restart.py``). A host whose password etcd no longer takes (rotated in
etcd before the hosts' configuration, a user removed) learns it when its watch stream breaks
and it logs in again: at a full restart (simple tokens are forgotten), every host at once.
docs/operations.md ("etcd refuses the watch") says what the registry does then: each refused
login and watch waits longer than the one before, up to a minute (``etcd_refusal.py``,
``EtcdAuth`` in ``security.py``), and the host is not reported down for it. Before, every host
tried again at the watch's resume rate (half a resume spread plus up to one spread: 1.5 to 4.5 s at
``spread=3``), forever. The ``resume-rate`` mode emulates that in the same code: the refused
watch's longest wait is its first one (``etcd_refusal.REFUSED_MAX``), a refused login among
them (not the login's own wait, which the watch follows since ``1d69bc7``), and a refused
login is not held (``EtcdAuth``'s refusal wait 0).

Per mode of ``--modes`` (one after the other, each on a fresh 3-member etcd on loopback with
simple tokens at bcrypt cost 10, etcd's defaults, ``bench/auth_restart.cluster``):
``--hosts`` (400) simulated hosts (``bench/fleet_host.Host``: the project's registry and
catalog, all in this process, each on its own gRPC connection from its own 127.20.x.y unless
``--shared-source``), watch-only, each following
one service (as a router of one), logged in as a user whose role may read and write the
prefix. Then the writes that make the members snapshot past every login, the user's password
changed in etcd (``etcdctl user passwd``), and every member SIGTERMed and started again (by
its pid). From the members serving again, for ``--window`` s (180): etcd's ``Authenticate``
calls (failed: not ``OK``) and ``Watch`` streams started, summed over the members and sampled
every 5 s, the members' CPU (and its busiest 5 s in the window's last ``--tail`` s), and the
hosts' states as their registries' state listeners tell (hosts told up while refused; hosts
down at the window's end). Then the password is set back, a new instance registered in the
followed service, and **followed again** is when each host's catalog holds it (from the fix).

Output: one JSON row per mode, a sample list per mode; raw result
``bench/results/auth-refused-etcd.json``. No target: the rows say what each way costs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
import time
import unittest.mock
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from auth_restart import (
    add_source_option,
    cluster,
    counted,
    fleet_on,
    followed,
    full_restart,
    host_url,
    members_cpu,
    own_sources_unless_shared,
    snapshot_after_logins,
)
from common import Report, measured, percentile, say
from fleet_host import Host, install_etcd_host_channels, raise_nofile

from discovery.registry import etcd_refusal, security
from discovery.retry import RetryAt

MODES = ("backoff", "resume-rate")
SPREAD = 3.0  # the hosts' resume spread (the URL's default)
SAMPLE_S = 5.0
NEW_PASSWORD = "rotated-in-etcd"


@contextmanager
def code_of(mode: str) -> Iterator[None]:
    """The refusal handling of ``mode``: as it is, or every refusal at the resume rate."""
    with ExitStack() as stack:
        if mode == "resume-rate":  # the watch's own wait, held at its first; logins not held
            stack.enter_context(unittest.mock.patch.object(
                etcd_refusal, "REFUSED_MAX", SPREAD / 2))
            stack.enter_context(unittest.mock.patch.object(
                etcd_refusal, "LoginRefused", type("NotRaised", (Exception,), {})))
            stack.enter_context(unittest.mock.patch.object(
                security, "RetryAt", lambda *_: RetryAt(0.0, 0.0)))
        yield


def passwd(c: Any, user: str, password: str) -> None:
    """``user``'s password in etcd set to ``password`` (etcdctl as root, by stdin)."""
    from tests.harness.secure import ETCDCTL

    argv = [ETCDCTL, "--endpoints", f"127.0.0.1:{c.client_ports[0]}", "--dial-timeout", "5s",
            "--user", f"root:{c.ROOT_PASSWORD}", "user", "passwd", user, "--interactive=false"]
    proc = subprocess.run(argv, input=password + "\n", capture_output=True, text=True,
                          timeout=60, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise RuntimeError(f"etcdctl user passwd {user}: {proc.stderr.strip()}")


def sample(c: Any) -> dict[str, float]:
    total, ok = counted(c, "Authenticate"), counted(c, "Authenticate", code="OK")
    watches = sum(c.grpc_counts("grpc_server_started_total", i=i).get("Watch", 0.0)
                  for i in range(len(c.procs)))
    return {"t": time.monotonic(), "logins_failed": total - ok, "logins_ok": ok,
            "watch_streams": watches, "cpu_s": members_cpu(c)}


def one_mode(mode: str, args: argparse.Namespace, work: Path, report: Report) -> dict[str, Any]:
    c = cluster("simple", work / mode)
    told: list[tuple[float, int, bool]] = []  # (monotonic, host, up): its states as told

    def tell(n: int, up: bool) -> None:
        told.append((time.monotonic(), n, up))  # (atomic)

    with fleet_on(c) as (loop, hosts), code_of(mode):  # (the mode's code while hosts run)
        prefix = "/alice/fleet"
        url = c.url_as(c.USER, c.USER_PASSWORD, prefix)
        root_url = c.url_as("root", c.ROOT_PASSWORD, prefix)
        host_args = argparse.Namespace(ttl=args.ttl, instances=0, services=10,
                                       watch_services=1, resync=30.0)
        for n in range(args.hosts):
            host = Host(n, f"{host_url(args, c, url, n)}?spread={SPREAD:g}", host_args, loop)
            host.start()
            assert host.registry is not None
            host.registry.add_state_listener(functools.partial(tell, n))
            hosts.append(host)
        say(f"{mode}: {args.hosts} hosts follow {host_args.services} services' one")
        snapshot_after_logins(root_url)
        passwd(c, c.USER, NEW_PASSWORD)
        stopped = time.monotonic()
        served = full_restart(c)
        say(f"{mode}: members serve again after {served[0] - stopped:.1f} s; the fleet is "
            f"refused for {args.window:g} s")
        samples = [sample(c)]
        while len(samples) * SAMPLE_S <= args.window:
            due = samples[0]["t"] + len(samples) * SAMPLE_S
            time.sleep(max(0.0, due - time.monotonic()))  # the measurement's own clock
            samples.append(sample(c))
        state, told_up = dict[int, bool](), set[int]()  # (told up: while refused, wrongly)
        for t, n, up in list(told):
            state[n] = up
            if up and t >= served[0]:
                told_up.add(n)
        down_now = sum(1 for up in state.values() if not up)
        passwd(c, c.USER, c.USER_PASSWORD)
        took = followed(hosts, root_url, (time.monotonic(), time.time()), args.wait)
        first, last = samples[0], samples[-1]
        span = last["t"] - first["t"]
        tail = samples[-1 - round(args.tail / SAMPLE_S):]
        tail_span = tail[-1]["t"] - tail[0]["t"]

        def per_host_min(key: str, a: dict[str, float], b: dict[str, float]) -> float:
            return round((b[key] - a[key]) / args.hosts / ((b["t"] - a["t"]) / 60), 2)

        report.emit({
            "name": "auth_refused", "mode": mode, "hosts": args.hosts,
            "window_s": round(span, 1),
            "failed_logins": round(last["logins_failed"] - first["logins_failed"]),
            "failed_logins_per_host_min": per_host_min("logins_failed", first, last),
            "failed_logins_per_host_min_last": per_host_min("logins_failed", tail[0], tail[-1]),
            "watch_streams": round(last["watch_streams"] - first["watch_streams"]),
            "watch_streams_per_host_min": per_host_min("watch_streams", first, last),
            "members_cpu_cores": round((last["cpu_s"] - first["cpu_s"]) / span, 2),
            "members_cpu_cores_last": round((tail[-1]["cpu_s"] - tail[0]["cpu_s"])
                                            / tail_span, 2),
            "members_cpu_cores_peak_last": round(max(
                (b["cpu_s"] - a["cpu_s"]) / (b["t"] - a["t"]) for a, b in pairwise(tail)), 2),
            "tail_s": round(tail_span, 1),
            "hosts_told_up": len(told_up), "hosts_down_at_end": down_now,
            "followed_again": len(took),
            "followed_again_p50_s": round(percentile(took, 0.5), 2),
            "followed_again_max_s": round(max(took), 2) if len(took) == len(hosts) else None,
            "target": None, "pass": None})
        return {"samples": [{k: round(v - first[k], 2) for k, v in s.items()}
                            for s in samples],
                "followed_again_s": sorted(round(t, 3) for t in took)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=400)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=180.0,
                    help="seconds the fleet is refused, from the members serving again")
    ap.add_argument("--tail", type=float, default=60.0,
                    help="the window's last seconds, reported apart (the rate it settles at)")
    ap.add_argument("--wait", type=float, default=150.0,
                    help="seconds to wait, after the fix, for every host to follow again")
    ap.add_argument("--no-save", action="store_true")
    add_source_option(ap)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not (1 <= args.hosts <= 1000 and set(modes) <= set(MODES) and 20 <= args.window <= 600
            and 2 * SAMPLE_S <= args.tail <= args.window and 5 <= args.wait <= 600):
        ap.error(f"--hosts 1..1000, --modes of {','.join(MODES)}, --window 20..600, "
                 f"--tail {2 * SAMPLE_S:g}..window, --wait 5..600")
    own_sources_unless_shared(args)
    logging.basicConfig(level=logging.CRITICAL)  # each host's refusal warnings, hundreds
    raise_nofile()
    install_etcd_host_channels()

    def run(work: Path, report: Report) -> dict[str, Any]:
        return {mode: one_mode(mode, args, work, report) for mode in modes}

    return measured("auth-refused", "etcd", "refused fleet", run, save=not args.no_save)


if __name__ == "__main__":
    sys.exit(main())
