"""What ``bench/fleet.py`` reads of the registry members and of the kernel: each member's
request counters (etcd's ``/metrics``, ZooKeeper's ``mntr``), pid, RSS and CPU; a sampler of
their request rate through a restart; and every fleet connection's bytes (``ss -ti``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from procs import cpu_ticks, rss_kib

from discovery.registry.zk_rewind import four_letter

CLK_TCK = os.sysconf("SC_CLK_TCK")


_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
ETCD_GAUGES = ("etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes",
               "etcd_debugging_mvcc_keys_total", "etcd_debugging_mvcc_watcher_total",
               "etcd_debugging_mvcc_watch_stream_total",
               "etcd_network_client_grpc_sent_bytes_total",
               "etcd_network_client_grpc_received_bytes_total",
               "etcd_server_proposals_committed_total")
#: what counts as a request: (metric, grpc_type)
ETCD_REQUESTS = {("grpc_server_handled_total", "unary"),
                 ("grpc_server_msg_received_total", "bidi_stream")}
ZK_KEYS = ("zk_packets_received", "zk_packets_sent", "zk_num_alive_connections",
           "zk_watch_count", "zk_znode_count", "zk_ephemerals_count",
           "zk_approximate_data_size", "zk_outstanding_requests", "zk_avg_latency",
           "zk_max_latency")


def etcd_counters(port: int, timeout: float = 2.0) -> dict[str, float]:
    """Requests (unary handled + stream messages received, by method) and a few gauges."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {"requests": 0.0}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
        method = labels.get("grpc_method", "")
        if (name, labels.get("grpc_type")) in ETCD_REQUESTS:
            out["requests"] += value
            out[f"req.{method}"] = out.get(f"req.{method}", 0.0) + value
        elif name in ETCD_GAUGES:
            out[name] = out.get(name, 0.0) + value
    return out


def zk_counters(port: int, timeout: float = 2.0) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in four_letter("127.0.0.1", port, "mntr", timeout).splitlines():
        key, _, value = line.partition("\t")
        if key in ZK_KEYS:
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    out["requests"] = out.get("zk_packets_received", 0.0)
    return out


class Servers:
    """The cluster plus how to read each member's counters, pid, RSS and CPU."""

    def __init__(self, backend: str, work: Path, zk_jvm: str = "test",
                 zk_io: str = "direct", etcd_procs: int = 1, ttl: float = 10.0) -> None:
        from tests.harness.servers import (
            ZK_DIRECT_IO,
            ZK_SERVER_JVM,
            ZK_TEST_JVM,
            ZK_TICK_MS,
            EtcdCluster,
            ZkEnsemble,
        )

        self.backend = backend
        jvm = ZK_SERVER_JVM if zk_jvm == "server" else ZK_TEST_JVM
        settings = ZK_DIRECT_IO if zk_io == "direct" else ()
        if ttl * 1000 > 20 * ZK_TICK_MS:  # ZooKeeper caps sessions at 20 ticks unless told
            settings = (*settings, f"maxSessionTimeout={round(ttl * 1000)}")
        self.cluster = (EtcdCluster(3, work / "etcd", etcd_procs) if backend == "etcd"
                        else ZkEnsemble(3, work / "zk", jvm, settings))
        self._readers = ThreadPoolExecutor(max_workers=3)  # one per member

    def counters(self) -> list[dict[str, float] | None]:
        """Every member's counters, read at once (one thread each): a member slow to answer
        (a ZooKeeper's ``mntr`` in a reconnect burst takes a second) delays no other's."""
        read = etcd_counters if self.backend == "etcd" else zk_counters

        def one(port: int) -> dict[str, float] | None:
            try:
                return read(port)
            except (OSError, ValueError):
                return None

        return list(self._readers.map(one, self.cluster.client_ports))

    def pids(self) -> list[int | None]:
        return [p.popen.pid if p.running and p.popen else None for p in self.cluster.procs]

    def usage(self) -> dict[str, Any]:
        pids = self.pids()
        return {"rss_mib": [round(rss_kib(p).get("VmRSS", 0) / 1024, 1) if p else None
                            for p in pids],
                "ticks": [cpu_ticks(p, tree=False) if p else None for p in pids]}


def total(counts: Sequence[dict[str, float] | None], key: str = "requests") -> float:
    return sum((c or {}).get(key, 0.0) for c in counts)


class RateSampler:
    """Server request totals every ``interval`` s in a thread (restarts reset a member's
    counters: a drop counts as a restart from 0), each sample stamped when its reads ended, the
    next one due ``interval`` after the last began. A read that takes longer stretches the
    interval: :meth:`peak_per_s` tells the window it could resolve (``peak_window_s``)."""

    def __init__(self, servers: Servers, interval: float = 0.25,
                 workers: Sequence[int] = ()) -> None:
        self.servers, self.interval, self.workers = servers, interval, list(workers)
        # (time, the members' CPU seconds, the workers' CPU seconds) since the sample before:
        # what each side got of the machine through a restart
        self.cpu: list[tuple[float, float, float]] = []
        self._ticks: dict[int, int] = {}
        self.samples: list[tuple[float, float]] = []  # (time, cumulative requests)
        self._last: list[dict[str, float] | None] = [None] * 3
        self._acc: dict[str, float] = {}
        self.by_method: list[dict[str, float]] = []
        self.peak_from: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            counts = self.servers.counters()
            t = time.time()
            for i, c in enumerate(counts):
                if c is None:
                    continue
                last = self._last[i]
                for key, v in c.items():
                    if key != "requests" and not key.startswith("req."):
                        continue
                    before = None if last is None else last.get(key)
                    self._acc[key] = self._acc.get(key, 0.0) + (
                        v if before is None or v < before else v - before)
                self._last[i] = c
            self.samples.append((t, self._acc.get("requests", 0.0)))
            self.by_method.append(dict(self._acc))
            members = [p for p in self.servers.pids() if p]
            self.cpu.append((t, self._cpu_s(members), self._cpu_s(self.workers)))
            self._stop.wait(max(began + self.interval - time.time(), 0.0))

    def _cpu_s(self, pids: Sequence[int]) -> float:
        """CPU seconds ``pids`` used since the previous sample (a pid seen for the first time,
        such as a restarted member's: since it started)."""
        got = 0
        for pid in pids:
            ticks = cpu_ticks(pid, tree=False)
            got += max(ticks - self._ticks.get(pid, 0), 0)
            self._ticks[pid] = ticks
        return got / CLK_TCK

    def cpu_by_second(self, t0: float, seconds: int) -> list[list[float]]:
        """[second after ``t0``, the members' cores, the workers' cores] over whole seconds."""
        bins: dict[int, list[float]] = {}
        for t, m, w in self.cpu[1:]:  # the first: since each process started
            if 0 <= t - t0 < seconds:
                b = bins.setdefault(int(t - t0), [0.0, 0.0])
                b[0] += m
                b[1] += w
        return [[k, round(m, 2), round(w, 2)] for k, (m, w) in sorted(bins.items())]

    def methods_between(self, t0: float, t1: float) -> dict[str, float]:
        """Requests per method between the samples nearest ``t0`` and ``t1``."""
        i = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - t0))
        j = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - t1))
        a, b = self.by_method[i], self.by_method[j]
        return {k[4:]: round(b[k] - a.get(k, 0.0)) for k in b
                if k.startswith("req.") and b[k] - a.get(k, 0.0) > 0}

    def peak_per_s(self, since: float, window: float = 1.0) -> tuple[float, float | None]:
        """(highest rate over any ``window`` s or more ending after ``since``, when): for each
        sample, the rate since the latest sample at least ``window`` s before it."""
        s = self.samples
        best, when = 0.0, None
        k = 0
        for i in range(len(s)):
            if s[i][0] < since:
                continue
            while k + 1 < i and s[i][0] - s[k + 1][0] >= window:
                k += 1
            dt = s[i][0] - s[k][0]
            if dt >= window:
                rate = (s[i][1] - s[k][1]) / dt
                if rate > best:
                    best, when, self.peak_from = rate, s[i][0], s[k][0]
        return best, when


# ---------------------------------------------------------------- client-side bytes (kernel)


def socket_bytes(server_ports: Iterable[int], by_pid: bool = False) -> dict[str, list[int]]:
    """[connections, bytes sent, bytes received] over every established TCP connection to one
    of ``server_ports`` (tcp_info), per fleet source address (``127.20.0.0/16``), or with
    ``by_pid`` per process (``pid:<n>``: hosts that share 127.0.0.1)."""
    ports = {str(p) for p in server_ports}
    argv = ["ss", "-tinH", "state", "established"]
    argv += ["-p"] if by_pid else ["src", "127.20.0.0/16"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    res: dict[str, list[int]] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            parts = line.split()
            if by_pid:
                pid = re.search(r"pid=(\d+)", line)
                local, peer = parts[2], parts[3]
                key = f"pid:{pid.group(1)}" if pid else None
            else:
                local, peer = parts[-2], parts[-1]  # gRPC's: [::ffff:127.20.x.y]:port
                key = local.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            current = key if peer.rsplit(":", 1)[-1] in ports else None
            continue
        if current is None:
            continue
        sent = re.search(r"bytes_sent:(\d+)", line)
        recv = re.search(r"bytes_received:(\d+)", line)
        row = res.setdefault(current, [0, 0, 0])
        row[0] += 1
        row[1] += int(sent.group(1)) if sent else 0
        row[2] += int(recv.group(1)) if recv else 0
        current = None
    return res


def bytes_delta(before: dict[str, list[int]], after: dict[str, list[int]]
                ) -> dict[str, tuple[int, int]]:
    return {ip: (a[1] - before.get(ip, [0, 0, 0])[1], a[2] - before.get(ip, [0, 0, 0])[2])
            for ip, a in after.items()}
