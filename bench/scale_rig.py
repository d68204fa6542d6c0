"""``bench/scale.py``'s rig: the busybox ``httpd`` backends, the simulated agents that write the
instances straight into etcd, the watcher's log times, HAProxy's config check and runtime API,
a profiler of the watcher, and one node's bulk change.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from common import Unmeasured
from procs import HAPROXY_BIN, HOST, port_open, wait_until

from discovery.model import Instance, State
from tests.harness.util import free_port

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PORT_RANGE = (20000, 32000)  # below net.ipv4.ip_local_port_range (32768-60999 here)
TXN_OPS = 100  # etcd's default --max-txn-ops is 128


# --------------------------------------------------------------------------- helpers


class Httpds:
    """busybox httpd processes on 127.0.0.1, each answering ``GET /`` with its name."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports: dict[str, int] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> int:
        root = self.work / "www" / name
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text(name + "\n")
        port = free_port()
        proc = subprocess.Popen([BUSYBOX, "httpd", "-f", "-p", f"{HOST}:{port}", "-h", str(root)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        wait_until(lambda: port_open(port), 10, f"httpd {name} on :{port}")
        self.ports[name] = port
        return port

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class SimAgents:
    """Writes instances into etcd like ``n`` agents would: one lease each, batched puts."""

    def __init__(self, port: int, prefix: str, nodes: int) -> None:
        import pyetcd

        self.client = pyetcd.client(HOST, port, timeout=30)
        self.prefix = prefix
        self.leases = [self.client.lease(600) for _ in range(nodes)]

    def key(self, inst: Instance) -> str:
        return f"{self.prefix}/services/{inst.service}/{inst.id}"

    def put_many(self, node: int, instances: Sequence[Instance]) -> None:
        lease = self.leases[node]
        for i in range(0, len(instances), TXN_OPS):
            ops = [self.client.transactions.put(self.key(x), x.to_json(), lease=lease)
                   for x in instances[i:i + TXN_OPS]]
            self.client.transaction(compare=[], success=ops, failure=[])

    def put(self, node: int, inst: Instance) -> None:
        self.client.put(self.key(inst), inst.to_json(), lease=self.leases[node])

    def leave(self, node: int, inst: Instance) -> None:
        """Deregister ``inst`` as the agent does: ``draining`` first, then the delete."""
        self.put(node, inst.with_state(State.DRAINING))
        self.client.delete(self.key(inst))

    def close(self) -> None:
        for lease in self.leases:
            with contextlib.suppress(Exception):
                lease.revoke()
        self.client.close()


def sim_instance(service: str, node: int, port: int, *, serial: int,
                 state: State = State.UP) -> Instance:
    cid = f"{serial:012x}"
    return Instance(service=service, id=f"sim{node}:{cid}:{port}", node=f"sim{node}",
                    address=HOST, port=port, container_id=cid * 5 + "0000",
                    container_name=f"{service}-{node}", image="sim:1", state=state,
                    registered_at=time.time())


def log_times(text: str) -> dict[str, float]:
    """Wall-clock times (epoch s) of the watcher's milestones, from its log (1 ms resolution)."""
    marks = {"catalog loaded": "catalog_loaded", "HAProxy started with": "haproxy_started",
             "started HAProxy master pid": "haproxy_spawned", "watcher starting": "cli_ready"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        for needle, key in marks.items():
            if needle in line and key not in out:
                with contextlib.suppress(ValueError):
                    out[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


def haproxy_check_ms(config: Path) -> tuple[float | None, int]:
    """How long ``haproxy -c`` takes on the watcher's current config, and its line count."""
    try:
        lines = config.read_text().count("\n")
    except OSError:
        return None, 0
    t = time.monotonic()
    proc = subprocess.run([HAPROXY_BIN, "-c", "-q", "-f", str(config)],
                          capture_output=True, timeout=60, check=False)
    took = round((time.monotonic() - t) * 1000, 1)
    return (took if proc.returncode == 0 else None), lines


class Profiler:
    """``py-spy record --pid`` (raw folded stacks), stopped with SIGINT (it then writes)."""

    def __init__(self, binary: str, pid: int, out: Path, *, idle: bool) -> None:
        self.out, self.idle = out, idle
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
             "--nonblocking", "--output", str(out), *(["--idle"] if idle else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def top(self, n: int = 15) -> dict[str, Any]:
        """Samples, and the top functions by inclusive samples (the project's own frames
        only) and by self samples (any frame), in percent of all samples. With ``idle``
        (wall-clock profile) only the main thread's stacks count: waiting for a subprocess
        or a socket then shows where the main thread's time went."""
        incl: Counter[str] = Counter()
        leaf: Counter[str] = Counter()
        total = 0
        with contextlib.suppress(OSError):
            for line in self.out.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                c = int(count)
                frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                          and not f.startswith("thread ")]
                if not frames or (self.idle and "discovery/__main__.py" not in stack):
                    continue
                total += c
                for f in set(frames):
                    if "discovery/" in f:  # the project's own frames (not runpy, click, ...)
                        incl[f] += c
                leaf[frames[-1]] += c
        pct = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
        return {"samples": total, "wall_clock": self.idle,
                "inclusive": [[f, pct(c)] for f, c in incl.most_common(n)],
                "self": [[f, pct(c)] for f, c in leaf.most_common(n)]}


def admin_query(sock_path: Path, command: str, timeout: float = 10.0) -> str:
    """One command on HAProxy's admin socket; the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def serving_on_port(sock_path: Path, port: int) -> int:
    """Servers HAProxy still has in service (not in any maint) with this port. A plain scan of
    ``show servers state`` (16,000 lines at 1,000 x 10: building dicts per line, as
    ``parse_servers_state`` does, would make each poll, hence the resolution, several times
    slower)."""
    lines = admin_query(sock_path, "show servers state").splitlines()
    header = next((ln[2:].split() for ln in lines if ln.startswith("# be_id")), None)
    if header is None:
        return 0
    i_port, i_admin = header.index("srv_port"), header.index("srv_admin_state")
    want, count = str(port), 0
    for line in lines:
        f = line.split()
        if len(f) > i_port and f[i_port] == want and f[i_admin].isdigit() \
                and not int(f[i_admin]) & 0x27:
            count += 1
    return count


def bulk_change(agents: SimAgents, node: int, admin: Path, port: int,
                timeout: float = 60.0) -> dict[str, Any]:
    """Revoke ``node``'s lease (every instance it registered vanishes at once, as when a
    host's lease expires) and time it until HAProxy serves none of them."""
    before = serving_on_port(admin, port)
    polls: list[float] = []
    t0 = time.monotonic()
    agents.leases[node].revoke()
    while True:
        p0 = time.monotonic()
        left = serving_on_port(admin, port)
        polls.append((time.monotonic() - p0) * 1000)
        if left == 0:
            break
        if time.monotonic() - t0 > timeout:
            raise Unmeasured(f"bulk change: {left} servers still in service after {timeout:g}s")
    took = (time.monotonic() - t0) * 1000
    return {"servers_before": before, "applied_ms": round(took, 1),
            "poll_ms_p50": round(sorted(polls)[len(polls) // 2], 1), "polls": len(polls)}
