"""Real etcd and ZooKeeper servers on 127.0.0.1 for tests.

Servers run from the Debian packages (``/usr/bin/etcd``, ZooKeeper jars in /usr/share/java),
on free loopback ports, with data under pytest's tmp dirs. Every process is stopped by its
own pid; readiness is polled with a deadline.

Fixtures (session): ``etcd_single``, ``zk_single``, ``etcd_cluster3``, ``zk_ensemble3``.
Clusters can name their leader (``leader()``/``wait_leader()``: etcd's maintenance status,
ZooKeeper's ``srvr``) and SIGKILL a member by the pid they started (``kill_member``).

Fixtures (function): ``registry_url`` (str, params etcd/zk, unique prefix per test, single
nodes), ``registry_server`` (its server), ``cluster_url`` ((cluster, str), params etcd3/zk3,
every member running at the start). ``wait_until(pred, timeout, what)``; links tests cut:
:mod:`tests.harness.tcp_proxy`; writes the code never makes: :mod:`tests.harness.raw_clients`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from discovery.registry.zk_rewind import four_letter
from tests.harness.util import free_port as free_port  # re-exported: tests import it here
from tests.harness.util import server_ports, wait_for

T = TypeVar("T")

HOST = "127.0.0.1"
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
JAVA_BIN = shutil.which("java") or "/usr/bin/java"
#: SLF4J's simple binding first: /usr/share/java/* holds six bindings, and SLF4J took the
#: no-op one, so a member's zk.log held nothing (log4j's binding clashes with log4j-over-slf4j)
ZK_CLASSPATH = "/usr/share/java/slf4j-simple.jar:/usr/share/java/*"
#: what the simple binding writes to the member's zk.log: warnings and errors, timed
ZK_LOG_FLAGS = ("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS")
ZK_TICK_MS = 500  # minSessionTimeout = 2 ticks = 1 s, maxSessionTimeout = 20 ticks = 10 s
#: the tests' JVM: quick to start (a C1-only JIT), small
ZK_TEST_JVM = ("-Xmx256m", "-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
#: a JVM as ZooKeeper's own ``zkServer.sh`` starts a member (``ZK_SERVER_HEAP`` 1000 MiB, the
#: JVM's default collector and full JIT), for benchmarks that load the ensemble for minutes
ZK_SERVER_JVM = ("-Xmx1000m",)
#: zoo.cfg lines for members sharing a few cores under load (the fleet bench): the selector
#: thread does the socket I/O and the commit processor's the reads, not pools (2 x cores and
#: cores threads); ZooKeeper makes an unknown key a ``zookeeper.``-prefixed system property
ZK_DIRECT_IO = ("nio.numWorkerThreads=0", "commitProcessor.numWorkerThreads=0")
START_TIMEOUT = 60.0


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``pred`` until it returns something truthy (see tests.harness.util.wait_for)."""
    return wait_for(pred, timeout, interval=interval, message=what)


class _Proc:
    """One server process, started and stopped by its own pid."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path,
                 env: dict[str, str] | None = None) -> None:
        self.argv, self.log_path, self.cwd = argv, log_path, cwd
        self.env = None if env is None else {**os.environ, **env}
        self.popen: subprocess.Popen[bytes] | None = None
        self.wanted = False  # False after a deliberate stop/kill: its exit is no failure

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.wanted = True
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.cwd,
                                          env=self.env, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        self.wanted = False
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def signal(self, sig: int) -> None:
        if self.running and self.popen is not None:
            self.wanted = False
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class ServerCluster:
    """What EtcdCluster and ZkEnsemble share: members by index, start/stop, url()."""

    size: int

    scheme = ""

    def __init__(self, size: int, base_dir: Path) -> None:
        self.size, self.base_dir = size, base_dir
        self.procs: list[_Proc] = []
        self.client_ports: list[int] = []

    def url(self, prefix: str = "/discovery") -> str:
        hosts = ",".join(f"{HOST}:{p}" for p in self.client_ports)
        return f"{self.scheme}://{hosts}{prefix}"

    def address(self, i: int) -> tuple[str, int]:
        return HOST, self.client_ports[i]

    def start(self) -> None:
        for p in self.procs:
            p.start()
        self.wait_ready()

    def stop(self) -> None:
        for p in self.procs:  # all at once: a lone etcd leader would try to hand over first
            p.signal(signal.SIGTERM)
        for p in self.procs:
            p.stop(timeout=2.0)

    def stop_member(self, i: int) -> None:
        self.procs[i].stop()

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` (by the pid the harness started) and reap it: no goodbye to
        its peers or clients. ``start_member(i)`` brings it back on the same data dir."""
        self.procs[i].kill()

    def grpc_counts(self, name: str = "grpc_server_handled_total", i: int = 0,
                    code: str = "") -> dict[str, float]:
        """Member ``i``'s count by gRPC method of the calls it ended (or of ``name``, e.g.
        ``grpc_server_msg_received_total``; answered ``code`` only, if given)."""
        out: dict[str, float] = {}
        for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', self.metrics(i), re.M):
            if (method := re.search(r'grpc_method="([^"]+)"', m.group(1))) and (
                    not code or f'grpc_code="{code}"' in m.group(1)):
                out[method.group(1)] = out.get(method.group(1), 0.0) + float(m.group(2))
        return out

    def gauge(self, name: str, i: int = 0) -> float:
        """Member ``i``'s metric ``name`` (one with no labels, e.g.
        ``etcd_debugging_mvcc_watcher_total``), from its ``/metrics``."""
        found = re.search(rf"^{name} (\S+)$", self.metrics(i), re.M)
        assert found is not None, f"{name} not in member {i}'s /metrics"
        return float(found.group(1))

    def metrics(self, i: int = 0) -> str:
        """Member ``i``'s ``/metrics`` (Prometheus text)."""
        url = f"http://{HOST}:{self.client_ports[i]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def leader(self) -> int | None:
        """Index of the member every running member agrees leads now; None during an election."""
        raise NotImplementedError

    def wait_leader(self, timeout: float = START_TIMEOUT) -> int:
        """The leader's index, once there is one (see :meth:`leader`)."""
        found = wait_until(lambda: [] if (i := self.leader()) is None else [i], timeout,
                           f"a {self.scheme} leader among the running members")  # 0 is one
        return found[0]

    def start_member(self, i: int, wait: bool = True) -> None:
        self.procs[i].start()
        if wait:
            self.wait_ready()

    def ensure_running(self) -> None:
        if not all(p.running for p in self.procs):
            self.start()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            for i, p in enumerate(self.procs):
                if p.wanted and not p.running and p.popen is not None:
                    raise RuntimeError(f"{self.scheme} member {i} exited "
                                       f"{p.popen.returncode}:\n{p.log_tail()}")
            return all(self.member_ready(i) for i, p in enumerate(self.procs) if p.running)

        wait_until(ready, timeout, f"{self.scheme} cluster of {self.size} to serve")

    def member_ready(self, i: int) -> bool:
        raise NotImplementedError


class EtcdCluster(ServerCluster):
    """``go_procs``: each member's ``GOMAXPROCS`` (0: Go's default); ``extra``: more flags."""

    scheme = "etcd"

    def __init__(self, size: int, base_dir: Path, go_procs: int = 0,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(size, base_dir)
        env = {"GOMAXPROCS": str(go_procs)} if go_procs > 0 else None
        names = [f"m{i}" for i in range(size)]
        ports = server_ports(2 * size, HOST)  # a restarted member comes back on its own
        self.client_ports, peer_ports = ports[:size], ports[size:]
        initial = ",".join(f"{n}=http://{HOST}:{p}" for n, p in zip(names, peer_ports, strict=True))
        token = f"t-{uuid.uuid4().hex[:8]}"
        for i, name in enumerate(names):
            d = base_dir / name
            d.mkdir(parents=True, exist_ok=True)
            argv = [
                ETCD_BIN, "--name", name, "--data-dir", str(d / "data"),
                "--listen-client-urls", f"http://{HOST}:{self.client_ports[i]}",
                "--advertise-client-urls", f"http://{HOST}:{self.client_ports[i]}",
                "--listen-peer-urls", f"http://{HOST}:{peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://{HOST}:{peer_ports[i]}",
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                "--logger", "zap", "--log-level", "warn", *extra,
            ]
            self.procs.append(_Proc(argv, d / "etcd.log", d, env))
        self._clients: dict[int, Any] = {}

    def member_ready(self, i: int) -> bool:
        import pyetcd

        client = self._clients.get(i)
        if client is None:
            client = self._clients[i] = pyetcd.client(HOST, self.client_ports[i], timeout=1)
        try:
            client.get("/health")  # linearizable: needs a leader
        except Exception:
            client.close()
            self._clients.pop(i, None)
            return False
        return True

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any]:
        """etcd's ``/v3/maintenance/status`` of member ``i`` (the JSON gateway on its client
        port): ``header.member_id``, ``leader`` (member ids as decimal strings), ``raftTerm``."""
        req = urllib.request.Request(f"http://{HOST}:{self.client_ports[i]}/v3/maintenance/status",
                                     data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out: dict[str, Any] = json.load(resp)
        return out

    def leader(self) -> int | None:
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for i, p in enumerate(self.procs):
            if not p.running:
                continue
            try:
                st = self.status(i)
            except (OSError, ValueError):
                return None  # a running member that does not answer: not settled yet
            ids[str(st["header"]["member_id"])] = i
            leaders.add(str(st.get("leader", "0")))
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())  # None while the others still name a dead leader

    def stop(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        super().stop()


class ZkEnsemble(ServerCluster):
    scheme = "zk"

    def __init__(self, size: int, base_dir: Path, jvm: tuple[str, ...] = ZK_TEST_JVM,
                 settings: tuple[str, ...] = ()) -> None:
        super().__init__(size, base_dir)
        ports = server_ports(3 * size, HOST)  # a restarted member comes back on its own
        self.client_ports = ports[:size]
        quorum = list(zip(ports[size::2], ports[size + 1::2], strict=True))
        for i in range(size):
            d = base_dir / f"zk{i + 1}"
            (d / "data").mkdir(parents=True, exist_ok=True)
            (d / "data" / "myid").write_text(f"{i + 1}\n")
            lines = [
                f"tickTime={ZK_TICK_MS}", "initLimit=20", "syncLimit=10",
                f"dataDir={d / 'data'}", f"clientPort={self.client_ports[i]}",
                f"clientPortAddress={HOST}", "admin.enableServer=false",
                "4lw.commands.whitelist=*", "preAllocSize=1024", "forceSync=no",
                "maxClientCnxns=0", *settings,
            ]
            if size > 1:
                lines += [f"server.{j + 1}={HOST}:{pp}:{ep}" for j, (pp, ep) in enumerate(quorum)]
            (d / "zoo.cfg").write_text("\n".join(lines) + "\n")
            argv = [
                JAVA_BIN, *jvm, *ZK_LOG_FLAGS,
                "-Dzookeeper.jmx.log4j.disable=true", "-Dzookeeper.admin.enableServer=false",
                "-cp", ZK_CLASSPATH,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(d / "zoo.cfg"),
            ]
            self.procs.append(_Proc(argv, d / "zk.log", d))

    def four_letter(self, i: int, cmd: str, timeout: float = 1.0) -> str:
        return four_letter(*self.address(i), cmd, timeout)

    def mode(self, i: int) -> str:
        """``standalone``/``leader``/``follower``, or "" if not serving."""
        try:
            out = self.four_letter(i, "srvr")
        except OSError:
            return ""
        for line in out.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

    def member_ready(self, i: int) -> bool:
        return self.mode(i) in ("standalone", "leader", "follower")

    def leader(self) -> int | None:
        modes = {i: self.mode(i) for i, p in enumerate(self.procs) if p.running}
        if not all(m in ("leader", "follower") for m in modes.values()):
            return None  # someone is still electing or syncing
        leaders = [i for i, m in modes.items() if m == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        super().wait_ready(timeout)
        if self.size > 1:
            wait_until(lambda: any(self.mode(i) == "leader" for i in range(self.size)
                                   if self.procs[i].running), timeout, "a ZooKeeper leader")


# -- fixtures ------------------------------------------------------------------------------


def _started(cluster: ServerCluster) -> Iterator[ServerCluster]:
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerCluster]:
    yield from _started(EtcdCluster(1, tmp_path_factory.mktemp("etcd1")))


@pytest.fixture(scope="session")
def etcd_cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerCluster]:
    yield from _started(EtcdCluster(3, tmp_path_factory.mktemp("etcd3")))


@pytest.fixture(scope="session")
def zk_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerCluster]:
    yield from _started(ZkEnsemble(1, tmp_path_factory.mktemp("zk1")))


@pytest.fixture(scope="session")
def zk_ensemble3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerCluster]:
    yield from _started(ZkEnsemble(3, tmp_path_factory.mktemp("zk3")))


def unique_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["etcd", "zk"])
def registry_url(request: pytest.FixtureRequest) -> str:
    """A registry URL on a single-node server, with a prefix no other test uses."""
    server: ServerCluster = request.getfixturevalue(
        "etcd_single" if request.param == "etcd" else "zk_single")
    server.ensure_running()
    return server.url(unique_prefix())


@pytest.fixture
def registry_server(request: pytest.FixtureRequest, registry_url: str) -> ServerCluster:
    """The single-node server behind ``registry_url`` (to stop/start it, or read its ports)."""
    name = "etcd_single" if registry_url.startswith("etcd:") else "zk_single"
    server: ServerCluster = request.getfixturevalue(name)
    return server


@pytest.fixture(params=["etcd3", "zk3"])
def cluster_url(request: pytest.FixtureRequest) -> tuple[ServerCluster, str]:
    """(cluster, url) on a 3-member etcd cluster / ZooKeeper ensemble, all members up."""
    cluster: ServerCluster = request.getfixturevalue(
        "etcd_cluster3" if request.param == "etcd3" else "zk_ensemble3")
    cluster.ensure_running()
    return cluster, cluster.url(unique_prefix())
