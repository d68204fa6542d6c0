#!/usr/bin/env python3
"""DNS under abuse: UDP amplification per query type, and the server's RSS under padded queries.

The DNS server runs in its own process (``bench/dns_abuse.py --serve``: a Catalog and a
``DnsServer`` on a free 127.0.0.1 port), once with ``--udp-answer-limit 0`` (answers limited by
size only: the behaviour before issue 8) and once with the default limit (3). Zone: service
``a`` with 300 IPv4 and 150 IPv6 instances whose node names are 58-59 characters (the longest
SRV targets), service ``c`` with 150 short-named IPv4 instances.

1. **Amplification**: for each query type, the shortest query reaching the big answer
   (``a.service.discovery``), without EDNS and with EDNS 4096, sent ``--repeats`` times over UDP
   (the cache's windows come in turn): bytes out / bytes in, max and median.
2. **RSS** (default limit only): VmRSS of the server process before and after ``--padded``
   queries for ``c.service.discovery`` each carrying a different EDNS padding option of
   1..60000 random bytes, then as many for distinct missing names (NXDOMAIN, the cache's worst
   case), with the cache's entry count after each phase. Queries go one at a time (send, wait
   for the answer); each phase stops at ``--seconds``.

Loopback only; counts and time bounded; the server is stopped by its own pid. Writes
``bench/results/dns-abuse-none.json`` (``common.write_result``). Exit 0 when every amplification
with the default limit is at most 10x and the RSS grew by less than ``--max-growth-mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import say, started, write_result  # noqa: E402
from dnslib import EDNS0, DNSRecord, EDNSOption  # noqa: E402

QUERIES = [("a.service.discovery", "A"), ("a.service.discovery", "AAAA"),
           ("a.service.discovery", "SRV"), ("a.service.discovery", "ANY"),
           ("_a._tcp.service.discovery", "SRV"), ("nope.service.discovery", "A"),
           ("discovery", "SOA")]
LONG = "n" * 55


def serve(limit: int) -> int:
    """``--serve``: print the port, answer ``stats`` lines on stdin with the cache size."""
    from discovery.lookup.dns import DnsServer
    from discovery.model import Instance
    from discovery.model.catalog import Catalog
    from discovery.registry.base import Snapshot

    def inst(service: str, n: int, address: str, port: int, node: str) -> Instance:
        return Instance(service=service, id=f"{node}:{n:012x}:{port}", node=node,
                        address=address, port=port)

    instances = [
        *(inst("a", i, f"198.51.{100 + i // 250}.{i % 250 + 1}", 1000 + i, f"{LONG}{i:03d}")
          for i in range(300)),
        *(inst("a", 1000 + i, f"2001:db8::{i + 1:x}", 3000 + i, f"{LONG}6{i:03d}")
          for i in range(150)),
        *(inst("c", 2000 + i, f"203.0.113.{i + 1}", 80, f"c{i}") for i in range(150)),
    ]
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in instances}))
    with DnsServer(catalog, "127.0.0.1", 0, udp_answer_limit=limit) as server:
        print(json.dumps({"port": server.port}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                entries, nbytes = server.cache_size()
                print(json.dumps({"entries": entries, "bytes": nbytes}), flush=True)
    return 0


class Child:
    def __init__(self, limit: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", "--udp-answer-limit",
             str(limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        out: dict[str, int] = json.loads(self.proc.stdout.readline())
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the child leaves its loop and stops the server
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # by its own pid, via the Popen handle
            self.proc.wait(5)


def query(name: str, qtype: str, edns: int | None, pad: int = 0, ident: int = 0) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident or random.randrange(1, 0xFFFF)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, opts=[EDNSOption(12, os.urandom(pad))] if pad else []))
    return bytes(q.pack())


def amplification(port: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        for name, qtype in QUERIES:
            for edns in (None, 4096):
                request = query(name, qtype, edns)
                sizes = []
                for _ in range(repeats):
                    s.sendto(request, ("127.0.0.1", port))
                    sizes.append(len(s.recv(65535)))
                factors = [n / len(request) for n in sizes]
                rows.append({"name": name, "qtype": qtype, "edns": edns,
                             "bytes_in": len(request), "bytes_out_max": max(sizes),
                             "factor_max": round(max(factors), 2),
                             "factor_median": round(statistics.median(factors), 2)})
    return rows


def flood(child: Child, count: int, seconds: float, distinct_names: bool) -> dict[str, Any]:
    before = child.rss_kib()
    sent = bytes_in = answered = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        while sent < count and time.monotonic() < deadline:
            name = f"x{sent}.service.discovery" if distinct_names else "c.service.discovery"
            wire = query(name, "A", 4096, pad=random.randint(1, 60000))
            s.sendto(wire, ("127.0.0.1", child.port))
            sent += 1
            bytes_in += len(wire)
            try:
                s.recv(65535)
                answered += 1
            except TimeoutError:
                pass
    after = child.rss_kib()
    return {"distinct_names": distinct_names, "queries": sent, "answered": answered,
            "mib_sent": round(bytes_in / 2**20, 1), "rss_before_mib": round(before / 1024, 1),
            "rss_after_mib": round(after / 1024, 1),
            "rss_growth_mib": round((after - before) / 1024, 1), "cache": child.stats()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--udp-answer-limit", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=64, help="queries per type (windows in turn)")
    p.add_argument("--padded", type=int, default=20000, help="padded queries per RSS phase")
    p.add_argument("--seconds", type=float, default=60.0, help="time bound per RSS phase")
    p.add_argument("--max-growth-mib", type=float, default=16.0)
    args = p.parse_args()
    if args.serve:
        return serve(args.udp_answer_limit)
    if not (1 <= args.repeats <= 1000 and 0 <= args.padded <= 100_000
            and 0 < args.seconds <= 120):
        p.error("--repeats 1..1000, --padded 0..100000, --seconds (0, 120]")
    started_at = started()
    samples: dict[str, Any] = {"amplification": {}, "rss": []}
    for limit in (0, 3):
        say(f"amplification, udp answer limit {limit}")
        child = Child(limit)
        try:
            samples["amplification"][str(limit)] = amplification(child.port, args.repeats)
            if limit == 3:
                for distinct in (False, True):
                    say(f"RSS under {args.padded} padded queries (distinct names: {distinct})")
                    samples["rss"].append(flood(child, args.padded, args.seconds, distinct))
        finally:
            child.stop()
    worst = {k: max(r["factor_max"] for r in rows if r["edns"] == 4096)
             for k, rows in samples["amplification"].items()}
    worst_plain = {k: max(r["factor_max"] for r in rows if r["edns"] is None)
                   for k, rows in samples["amplification"].items()}
    growth = max(r["rss_growth_mib"] for r in samples["rss"]) if samples["rss"] else 0.0
    summary = {"max_amplification_edns4096": {"limit_0": worst["0"], "limit_3": worst["3"]},
               "max_amplification_no_edns": {"limit_0": worst_plain["0"],
                                             "limit_3": worst_plain["3"]},
               "rss": [{k: r[k] for k in ("distinct_names", "queries", "rss_before_mib",
                                          "rss_after_mib", "rss_growth_mib")}
                       | {"cache_entries": r["cache"]["entries"]} for r in samples["rss"]],
               "target": "amplification <= 10x with the default limit; RSS growth < "
                         f"{args.max_growth_mib} MiB",
               "pass": worst["3"] <= 10 and worst_plain["3"] <= 10
               and growth < args.max_growth_mib}
    path = write_result("dns-abuse", "none", started_at=started_at, summary=summary,
                        samples=samples)
    print(json.dumps(summary, indent=1))
    say(f"wrote {path}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
