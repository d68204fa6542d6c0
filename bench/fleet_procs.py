"""The parent side of ``bench/fleet.py``'s processes: the worker processes (``fleet.py
--worker``, spoken to over their stdin/stdout, stopped by their own pid), the source-address
library that gives etcd hosts their own source addresses (``bench/srcaddr.c``; also preloaded
by the auth benches in themselves), and the optional
HAProxy relay that did before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import ROOT
from fleet_host import PREFIX, source_ip
from procs import HAPROXY_BIN


class WorkerProc:
    """One worker process, spoken to over its stdin/stdout, stopped by its own pid."""

    def __init__(self, args: argparse.Namespace, log: Path, backend: str,
                 env: dict[str, str] | None = None) -> None:
        # The simulated hosts stand for other machines: niced, so that they do not starve the
        # registry members of CPU on this one (at 1,000 hosts an un-niced fleet took the etcd
        # members' heartbeats down: "no leader"). Their own timings only get worse for it.
        script = Path(__file__).with_name("fleet.py").resolve()
        if backend == "zk" and args.zk_hosts == "greenlets":
            script = script.with_name("fleet_greenlets.py")
        argv = ["nice", "-n", str(args.worker_nice), sys.executable, str(script), "--worker",
                "--ttl", str(args.ttl), "--resync", str(args.resync),
                "--instances", str(args.instances), "--services", str(args.services),
                "--watch-services", str(args.watch_services),
                "--start-parallel", str(args.start_parallel),
                "--start-attempts", str(args.start_attempts), "--full-gc", args.full_gc]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        # A new session is a new autogroup when the kernel groups by session
        # (/proc/sys/kernel/sched_autogroup_enabled): there ``nice`` only ranks threads within
        # the group, and the group's own weight is its autogroup nice.
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(args.worker_nice))
        self.lock = threading.Lock()
        self.count = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.pid} exited ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.pid}: {reply['error']}")
        return reply

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.send(cmd, **kw)
            return self.recv()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def quit(self, revoke: bool = True, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit", revoke=revoke)
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.kill()
        else:
            self.log.close()


def all_workers(workers: Sequence[WorkerProc], cmd: str, **kw: Any) -> list[dict[str, Any]]:
    for w in workers:
        with w.lock:
            w.send(cmd, **kw)
    return [w.recv() for w in workers]


# ---------------------------------------------------------------- relays (etcd only)


def free_port_block(count: int, start: int = 12000, stop: int = 32000) -> int:
    """The first port p in [start, stop) with p .. p + count - 1 all bindable on 127.0.0.1
    (below the ephemeral range, so no free_port() of another test picks one meanwhile)."""
    base = start
    while base + count <= stop:
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    base, ok = p + 1, False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {count} free ports below {stop}")


class Relay:
    """One HAProxy in TCP mode: for host n and member m, 127.0.0.1:<port> → member m's
    client port, from ``source_ip(n)``. Stopped by its own pid."""

    def __init__(self, hosts: Sequence[int], targets: Sequence[int], work: Path) -> None:
        self.targets = list(targets)
        self.base = free_port_block(len(hosts) * len(targets))
        self.ports: dict[int, list[int]] = {}
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxconn = max(1000, (hard - len(hosts) * len(targets) - 200) // 2)
        # A relay must not queue: while the members are down every host's channels retry
        # (about 6 connection attempts a second per host), and a relay that holds them (its
        # default 1 s turn-around before a retry, half-closed sessions, deep accept queues)
        # fills up and is still chewing dead attempts long after the members are back.
        lines = ["global", f"  maxconn {maxconn}", "  log stderr format short local0 err", "",
                 "defaults", "  mode tcp", "  maxconn 32", "  backlog 32",
                 "  timeout connect 500ms", "  timeout client 1h", "  timeout server 1h",
                 "  timeout client-fin 1s", "  timeout server-fin 1s", "  retries 0", ""]
        p = self.base
        for n in hosts:
            self.ports[n] = []
            for m, target in enumerate(self.targets):
                lines += [f"listen h{n}m{m}", f"  bind 127.0.0.1:{p}",
                          f"  server m{m} 127.0.0.1:{target} source {source_ip(n)}", ""]
                self.ports[n].append(p)
                p += 1
        self.cfg = work / "relay.cfg"
        self.cfg.write_text("\n".join(lines))
        self.log = (work / "relay.log").open("ab")
        self.proc = subprocess.Popen([HAPROXY_BIN, "-db", "-f", str(self.cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        last = self.ports[hosts[-1]][-1]
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay HAProxy exited {self.proc.returncode}: "
                                   f"{(work / 'relay.log').read_text()[-1500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", last), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("relay HAProxy not listening within 30 s")
            time.sleep(0.1)

    def url(self, n: int) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[n]) + PREFIX

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


SRCADDR_PORTS = "DISCOVERY_SRCADDR_PORTS"  # (read by bench/srcaddr.c at each connect)
_PRELOADED = "DISCOVERY_SRCADDR_PRELOADED"


def build_srcaddr(where: Path) -> Path:
    """``bench/srcaddr.c`` built with the system's C compiler, in ``where``."""
    lib = where / "srcaddr.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib),
                    str(Path(__file__).with_name("srcaddr.c")), "-ldl"], check=True)
    return lib


def source_addresses(work: Path, ports: Sequence[int]) -> dict[str, str]:
    """The environment of workers whose etcd hosts connect from their own 127.20.x.y: gRPC
    cannot bind a source address, so ``bench/srcaddr.c`` is preloaded, and rewrites a connect()
    to 127.20.x.y on one of ``ports`` into one from 127.20.x.y to 127.0.0.1 (a host's URL names
    its own address: ``fleet_host.from_own_source``)."""
    return {"LD_PRELOAD": str(build_srcaddr(work)), SRCADDR_PORTS: ",".join(map(str, ports))}


def preload_source_addresses() -> None:
    """For a bench whose hosts are threads of its own process (the auth benches): this process
    started again (``sys.argv``) with ``bench/srcaddr.c`` preloaded; in the new one, checked
    loaded, its file removed (mapped already) and ``LD_PRELOAD`` dropped from the environment,
    so that no child (etcd, etcdctl) carries it. The ports are set when known:
    ``connect_from_own``."""
    lib = os.environ.pop(_PRELOADED, None)
    if lib is None:
        where = Path(tempfile.mkdtemp(prefix="discovery-srcaddr-"))
        lib = str(build_srcaddr(where))
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "LD_PRELOAD": lib, _PRELOADED: lib})
    os.environ.pop("LD_PRELOAD", None)
    loaded = lib in Path("/proc/self/maps").read_text()
    shutil.rmtree(Path(lib).parent, ignore_errors=True)
    if not loaded:
        raise RuntimeError(f"{lib} was not preloaded: the hosts cannot have their own sources")


def connect_from_own(ports: Sequence[int]) -> None:
    """The ports (the members') that this process's hosts reach from their own 127.20.x.y
    (``preload_source_addresses``): read by the library at each connect."""
    os.environ[SRCADDR_PORTS] = ",".join(map(str, ports))
