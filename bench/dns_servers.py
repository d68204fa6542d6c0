"""``bench/dns.py``'s servers: ours (``bench/dns.py --serve``: a ``Catalog`` and a ``DnsServer``)
and dnsmasq, each given the same zone, with the churn of one instance that comes and goes.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import CLK_TCK
from dns_zone import CHURN_SERVICE, DOMAIN, dig, qname, zone

from discovery.model import Instance

# --- the servers -------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """``--serve``: our DnsServer on ``--port`` with the bench zone, until SIGTERM."""
    from discovery.lookup.dns import DnsServer
    from discovery.model.catalog import Catalog
    from discovery.registry.base import Snapshot

    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in zone(args.services, args.instances)}))
    hook = None
    if args.metrics:  # a Prometheus counter per (qtype, rcode), children cached
        from prometheus_client import Counter

        counter = Counter("bench_dns_queries", "DNS queries", ["qtype", "rcode"])
        children: dict[tuple[str, str], Any] = {}

        def hook(qtype: str, rcode: str) -> None:
            child = children.get((qtype, rcode))
            if child is None:
                child = children[(qtype, rcode)] = counter.labels(qtype, rcode)
            child.inc()

    server = DnsServer(catalog, port=args.port, udp_threads=args.udp_threads,
                       on_query=hook).start()
    if args.changes_per_s:
        threading.Thread(target=churn_catalog, args=(catalog, args.changes_per_s),
                         daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


def churn_instance() -> Instance:
    return Instance(service=CHURN_SERVICE, id="churn:000000000000:80", node="churn",
                    address="127.255.255.1", port=8999, weight=100)


def churn_catalog(catalog: Any, per_s: int) -> None:
    """Put / delete :func:`churn_instance` ``per_s`` times a second (a registry change each)."""
    from discovery.registry import Change

    inst = churn_instance()
    period, k = 1.0 / per_s, 0
    nxt = time.monotonic()
    while True:
        k += 1
        catalog.apply(Change("put", inst.key, inst) if k % 2 else Change("delete", inst.key))
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))


def churn_dnsmasq(proc: subprocess.Popen[str], hosts: Path, per_s: int,
                  stop_at: threading.Event) -> int:
    """The same change for dnsmasq: rewrite its hosts file with / without the churn instance
    and SIGHUP it (dnsmasq re-reads addn-hosts on SIGHUP), ``per_s`` times a second."""
    base = hosts.read_text()
    inst = churn_instance()
    extra = f"{inst.address} {inst.service}.service.{DOMAIN} {inst.node}.node.{DOMAIN}\n"
    period, k = 1.0 / per_s, 0
    nxt = time.monotonic()
    while not stop_at.is_set() and proc.poll() is None:
        k += 1
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text(base + extra if k % 2 else base)
        tmp.chmod(0o644)
        tmp.replace(hosts)
        proc.send_signal(signal.SIGHUP)
        nxt += period
        stop_at.wait(max(0.0, nxt - time.monotonic()))
    hosts.write_text(base)
    return k


def start_ours(args: argparse.Namespace, port: int, work: Path, services: int,
               changes_per_s: int = 0) -> subprocess.Popen[str]:
    script = Path(__file__).with_name("dns.py").resolve()  # its --serve
    cmd = [sys.executable, str(script), "--serve", "--port", str(port),
           "--services", str(services), "--instances", str(args.instances),
           "--udp-threads", str(args.udp_threads),
           "--changes-per-s", str(changes_per_s)] + (["--metrics"] if args.metrics else [])
    with open(work / "ours.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        stop(proc)
        raise RuntimeError(f"our server did not start: see {work / 'ours.log'}")
    return proc


def start_dnsmasq(args: argparse.Namespace, port: int, work: Path,
                  records: list[Instance]) -> subprocess.Popen[str]:
    hosts = work / "hosts"
    lines = [f"{r.address} {r.service}.service.{DOMAIN} {r.node}.node.{DOMAIN}" for r in records]
    hosts.write_text("\n".join(lines) + "\n")
    work.chmod(0o755)  # dnsmasq reads it after dropping to nobody
    hosts.chmod(0o644)
    srv = work / "srv.conf"
    srv.write_text("".join(f"srv-host=_{r.service}._tcp.service.{DOMAIN},{r.node}.node.{DOMAIN},"
                           f"{r.port},1,{r.weight}\n" for r in records))
    srv.chmod(0o644)
    cmd = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--conf-file={srv}",
           f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
           f"--addn-hosts={hosts}", f"--local=/{DOMAIN}/", "--local-ttl=0", "--pid-file=",
           f"--log-facility={work / 'dnsmasq.log'}"]
    (work / "dnsmasq.cmd").write_text(shlex.join(cmd) + "\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # ready when it answers
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited {proc.returncode}: see {work / 'dnsmasq.log'}")
        if dig(port, qname(records[0].service, "A"), "A"):
            return proc
        time.sleep(0.1)
    stop(proc)
    raise RuntimeError("dnsmasq did not answer within 10 s")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
