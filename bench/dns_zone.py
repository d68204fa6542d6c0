"""``bench/dns.py``'s zone: the synthetic records both servers answer, the names each workload
asks, and the ``dig`` checks of the answers against the records.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Sequence

from discovery.model import Instance

DOMAIN = "discovery"


def zone(services: int, instances: int) -> list[Instance]:
    out = []
    for s in range(services):
        for i in range(instances):
            node = f"h{s}x{i}"
            out.append(Instance(service=f"svc{s}", id=f"{node}:{s:06x}{i:06x}:80", node=node,
                                address=f"127.{s // 250}.{s % 250}.{i + 1}", port=8000 + i,
                                weight=100))
    return out


def expected(records: list[Instance], name: str, qtype: str) -> set[str]:
    svc = name.split(".")[0].lstrip("_")
    mine = [r for r in records if r.service == svc]
    if qtype == "A":
        return {r.address for r in mine}
    return {f"1 100 {r.port} {r.node}.node.{DOMAIN}." for r in mine}


#: what each --workloads name asks, and of what zone (see the module docstring)
WORKLOADS = ("hot", "distinct", "nx", "churn")
CHURN_SERVICE = "svc0"  # the service whose instance comes and goes in the churn workload
COREDNS_REFERENCE_QPS = 33_700  # published figure, 2 vCPU; cited, not measured here


def query_names(workload: str, services: int, distinct: int) -> list[str]:
    """The services (or missing names) a workload's query file asks for."""
    if workload == "distinct":
        return [f"svc{s}" for s in range(distinct)]
    if workload == "nx":
        return [f"nx{s}" for s in range(distinct)]
    return [f"svc{s}" for s in range(services)]


def zone_size(args: argparse.Namespace, workload: str) -> int:
    return args.distinct if workload == "distinct" else args.services


def qname(service: str, qtype: str) -> str:
    return f"{service}.service.{DOMAIN}" if qtype == "A" else f"_{service}._tcp.service.{DOMAIN}"


def dig(port: int, name: str, qtype: str) -> set[str]:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=2",
                          "+tries=2", name, qtype], capture_output=True, text=True, timeout=30)
    return set(out.stdout.split("\n")) - {""}


def dig_sections(port: int, name: str, qtype: str) -> tuple[str, set[str], set[str]]:
    """(rcode, answer records, additional records) as ``name type data``, TTLs left out."""
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+noall", "+comments",
                          "+answer", "+additional", "+time=2", "+tries=2", name, qtype],
                         capture_output=True, text=True, timeout=30).stdout
    status = re.search(r"status: ([A-Z]+)", out)
    rcode = status.group(1) if status else "?"
    sections: dict[str, set[str]] = {"ANSWER": set(), "ADDITIONAL": set()}
    current = ""
    for line in out.splitlines():
        head = re.match(r";; (\w+) SECTION:", line)
        if head:
            current = head.group(1)
        elif line and not line.startswith(";") and current in sections:
            f = line.split()
            if len(f) >= 5 and f[3] != "OPT":
                sections[current].add(" ".join([f[0].lower(), f[3], *f[4:]]))
    return rcode, sections["ANSWER"], sections["ADDITIONAL"]


def expected_additional(records: list[Instance], name: str, qtype: str) -> set[str]:
    """For SRV: an A record for each target."""
    svc = name.split(".")[0].lstrip("_")
    if qtype != "SRV":
        return set()
    return {f"{r.node}.node.{DOMAIN}. A {r.address}" for r in records if r.service == svc}


def check(port: int, records: list[Instance], qtype: str, services: Sequence[str],
          *, nx: bool = False) -> tuple[list[str], list[str]]:
    """Ask every sampled name with dig: (answer mismatches, additional-section mismatches)."""
    bad: list[str] = []
    extra: list[str] = []
    for svc in services:
        name = qname(svc, qtype)
        if nx:
            rcode, _, _ = dig_sections(port, name, qtype)
            if rcode != "NXDOMAIN":
                bad.append(f"{name} {qtype}: rcode {rcode}, want NXDOMAIN")
            continue
        got, want = dig(port, name, qtype), expected(records, name, qtype)
        if got != want:
            bad.append(f"{name} {qtype}: got {sorted(got)}, want {sorted(want)}")
        _, _, additional = dig_sections(port, name, qtype)
        want_add = expected_additional(records, name, qtype)
        if additional != want_add:
            extra.append(f"{name} {qtype}: additional {sorted(additional)}, want "
                         f"{sorted(want_add)}")
    return bad, extra
