#!/usr/bin/env python3
"""How late a lease renewal's answer comes, straight from an etcd member and through
``etcd grpc-proxy``: the figures ``discovery/registry/etcd_keepalive.py`` relies on to tell a
member (which it need not probe) from a proxy (which answers at its own next renewal).

A single-member etcd (the harness's ``EtcdCluster(1)``) and one proxy in front of it, on
loopback. ``--proxy-leases`` (20) leases through the proxy and ``--member-leases`` (4) straight
to the member, TTL ``--ttl`` (10 s), each renewed ``--renewals`` (36) times on its own
``LeaseKeepAlive`` stream, a renewal interval (TTL/3, ±10 % as the registry's keeper) after
the previous answer. Each answer's delay (request written → answer read) is a sample.

Summary per path: samples, within ``FAST`` (a member's own, ``etcd_keepalive.FAST``), over
``LATE`` (``etcd_keepalive.LATE``: the member is marked late), p50, max; and the odds that a
proxy passes for a member (``PROMPT`` answers within ``FAST`` before its first over ``LATE``,
the first answer of a lease counted as fast: (fast / (fast + late)) ^ (PROMPT - 1)).

Raw result: ``bench/results/proxy-renewals-etcd.json``. etcd and the proxy are stopped by
their pids.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Report,
    measured,
    percentile,
    say,
)

from discovery.registry.etcd_keepalive import FAST, LATE, PROMPT
from discovery.retry import jittered


def renew(port: int, ttl: float, renewals: int, out: list[float]) -> None:
    """One lease on its own stream to ``127.0.0.1:port``: ``renewals`` delays into ``out``."""
    import grpc
    from pyetcd import etcdrpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        lease = etcdrpc.LeaseStub(channel).LeaseGrant(
            etcdrpc.LeaseGrantRequest(TTL=round(ttl)), timeout=5)
        asks: queue.Queue[bool] = queue.Queue()

        def requests() -> Iterator[Any]:
            while asks.get():
                yield etcdrpc.LeaseKeepAliveRequest(ID=lease.ID)

        answers = etcdrpc.LeaseStub(channel).LeaseKeepAlive(requests())
        try:
            for _ in range(renewals):
                sent = time.monotonic()
                asks.put(True)
                next(answers)
                out.append(time.monotonic() - sent)
                time.sleep(jittered(ttl / 3))
        finally:
            asks.put(False)
            answers.cancel()
    finally:
        channel.close()


def summarize(path: str, delays: Sequence[float], report: Report) -> dict[str, Any]:
    fast = sum(d <= FAST for d in delays)
    late = sum(d > LATE for d in delays)
    odds = (fast / (fast + late)) ** (PROMPT - 1) if fast + late else None
    return report.emit({
        "name": "renewal_answer", "path": path, "n": len(delays),
        "within_fast": fast, "over_late": late, "fast_s": FAST, "late_s": LATE,
        "p50_ms": round(percentile(delays, 0.5) * 1000, 2),
        "min_ms": round(min(delays) * 1000, 2), "max_ms": round(max(delays) * 1000, 2),
        "odds_taken_for_a_member": odds, "prompt": PROMPT})


def run(args: argparse.Namespace, work: Path, report: Report) -> dict[str, list[float]]:
    from tests.harness.fleet import EtcdGrpcProxy
    from tests.harness.servers import EtcdCluster

    cluster = EtcdCluster(1, work / "etcd")
    proxy: EtcdGrpcProxy | None = None
    try:
        cluster.start()
        cluster.wait_ready()
        proxy = EtcdGrpcProxy(cluster, work / "proxy").start()
        delays: dict[str, list[float]] = {"proxy": [], "member": []}
        ports = ([("proxy", proxy.port)] * args.proxy_leases
                 + [("member", cluster.client_ports[0])] * args.member_leases)
        say(f"{len(ports)} leases, {args.renewals} renewals each, TTL {args.ttl:g} s "
            f"(~{args.renewals * args.ttl / 3:.0f} s)")
        threads = [threading.Thread(target=renew, daemon=True,
                                    args=(port, args.ttl, args.renewals, delays[path]))
                   for path, port in ports]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for path, ds in delays.items():
            expected = args.renewals * (args.proxy_leases if path == "proxy"
                                        else args.member_leases)
            if len(ds) != expected:
                raise RuntimeError(f"{path}: {len(ds)} of {expected} renewals answered")
            summarize(path, ds, report)
        return {path: [round(d, 5) for d in ds] for path, ds in delays.items()}
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--renewals", type=int, default=36)
    ap.add_argument("--proxy-leases", type=int, default=20)
    ap.add_argument("--member-leases", type=int, default=4)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if not (1 <= args.renewals <= 200 and 1 <= args.proxy_leases <= 100
            and 1 <= args.member_leases <= 100 and 1 <= args.ttl <= 60):
        ap.error("--renewals 1..200, --proxy-leases/--member-leases 1..100, --ttl 1..60")
    return measured("proxy-renewals", "etcd", "proxy renewals",
                    lambda work, report: run(args, work, report), save=not args.no_save)


if __name__ == "__main__":
    sys.exit(main())
