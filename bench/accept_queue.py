#!/usr/bin/env python3
"""Where the churn's ~1 s maximum latency comes from: a full accept queue and a SYN retransmit.

The example app is busybox ``httpd``, which listens with a backlog of 9 and forks per
connection. HAProxy opens one connection to it per request (httpd closes after each response).
When connections arrive faster than httpd accepts them, the kernel drops the SYN
(``TcpExtListenOverflows`` / ``TcpExtListenDrops``), and the connecting side retransmits it
after the initial RTO of 1 s: that request takes ~1 s more. This script reproduces it without
Docker, the registry or our watcher, on loopback, for a bounded time per variant:

* ``direct``: ``wrk -H 'Connection: close'`` straight at ``--apps`` busybox httpds (round robin
  over them is not possible with one wrk, so at the first one);
* ``haproxy``: the same apps behind an HAProxy 2.6 with the watcher template's defaults
  (``retries 2``, ``option redispatch``, ``retry-on conn-failure ...``, ``timeout connect
  5s``), wrk with keep-alive (as in the churn);
* ``haproxy-connect-100ms``: the same with ``timeout connect 100ms``: a SYN that is dropped is
  retried (redispatched) after 100 ms instead of waiting for the 1 s retransmit.

For each: requests, latency percentiles and max (wrk), the host's TCP counters over the run
(``nstat`` sources) and the apps' listen backlog (``ss -ltn``). The raw result goes to
``bench/results/accept-queue-none.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import Report, say  # noqa: E402
from procs import HAPROXY_BIN, HOST, HostLoad, port_open, wait_until  # noqa: E402

from tests.harness.util import free_port  # noqa: E402

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
VARIANTS = ("direct", "haproxy", "haproxy-connect-100ms")

WRK_LUA = """-- written by bench/accept_queue.py
done = function(summary, latency, requests)
  local pct = {}
  for _, p in ipairs({50, 90, 99, 99.9, 99.99}) do
    table.insert(pct, string.format('"%g":%d', p, latency:percentile(p)))
  end
  io.write(string.format(
    '\\nWRKJSON {"requests":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"max_us":%d,"percentiles_us":{%s}}\\n',
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency.max, table.concat(pct, ",")))
end
"""

HAPROXY_CFG = """global
    maxconn 4096
defaults
    mode http
    option redispatch
    retries 2
    timeout connect {connect}
    timeout client 60s
    timeout server 60s
frontend fe
    bind {host}:{port}
    default_backend be
backend be
    balance roundrobin
    retry-on conn-failure empty-response response-timeout
{servers}
"""


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start(procs: list[subprocess.Popen[bytes]], argv: Sequence[str]) -> None:
    procs.append(subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True))


def backlog(port: int) -> int | None:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=5, check=False).stdout.split()
    return int(out[2]) if len(out) > 2 and out[2].isdigit() else None


def run_variant(args: argparse.Namespace, work: Path, variant: str) -> dict[str, Any]:
    with processes() as procs:
        www = work / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("ok\n")
        apps = []
        for _ in range(args.apps):
            port = free_port()
            start(procs, [BUSYBOX, "httpd", "-f", "-p", f"{HOST}:{port}", "-h", str(www)])
            wait_until(functools.partial(port_open, port), 10, f"httpd on :{port}")
            apps.append(port)
        target, close = apps[0], True
        if variant != "direct":
            target, close = free_port(), False
            cfg = work / f"{variant}.cfg"
            cfg.write_text(HAPROXY_CFG.format(
                connect="100ms" if variant.endswith("100ms") else "5s", host=HOST, port=target,
                servers="\n".join(f"    server s{i} {HOST}:{p}" for i, p in enumerate(apps))))
            start(procs, [HAPROXY_BIN, "-f", str(cfg)])
            wait_until(lambda: port_open(target), 10, "haproxy")
        script = work / "aq.lua"
        script.write_text(WRK_LUA)
        argv = ["wrk", "-t1", f"-c{args.conns}", f"-d{args.seconds}s", "--timeout", "5s",
                "-s", str(script)] + (["-H", "Connection: close"] if close else [])
        load = HostLoad().start()
        out = subprocess.run([*argv, f"http://{HOST}:{target}/"], capture_output=True,
                             text=True, timeout=args.seconds + 30, check=False).stdout
        host = load.read()
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("WRKJSON ")), "")
        if not line:
            raise SystemExit(f"wrk printed no summary:\n{out[-2000:]}")
        wrk = json.loads(line[len("WRKJSON "):])
        return {"name": "accept_queue", "variant": variant, "n": wrk["requests"],
                "p50_ms": round(wrk["percentiles_us"]["50"] / 1000, 2),
                "p99_ms": round(wrk["percentiles_us"]["99"] / 1000, 2),
                "p99_9_ms": round(wrk["percentiles_us"]["99.9"] / 1000, 2),
                "p99_99_ms": round(wrk["percentiles_us"]["99.99"] / 1000, 2),
                "max_ms": round(wrk["max_us"] / 1000, 2),
                "errors": {k: wrk[k] for k in ("connect", "read", "write", "status", "timeout")},
                "app_backlog": backlog(apps[0]), "apps": args.apps,
                "load": f"wrk -t1 -c{args.conns} -d{args.seconds}s"
                        + (" Connection: close" if close else " keep-alive"),
                "target": None, "pass": None, **host}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--apps", type=int, default=4, help="busybox httpds (the churn's pool: 4)")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per variant")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS) or not 1 <= args.apps <= 16 or \
            not 1 <= args.conns <= 256 or not 1 <= args.seconds <= 120:
        ap.error(f"--variants from {','.join(VARIANTS)}; --apps 1..16; --conns 1..256; "
                 "--seconds 1..120")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    report = Report()
    mark = report.mark()
    work = Path(tempfile.mkdtemp(prefix="bench-aq-"))
    work.chmod(0o755)
    try:
        for variant in variants:
            say(f"{variant}: {args.seconds}s of wrk -c{args.conns}")
            report.emit(run_variant(args, work, variant))
            time.sleep(1.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.save("accept-queue", "none", mark, report.rows[mark[0]:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
