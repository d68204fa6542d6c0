"""A private single-node etcd on loopback for ``discovery up --dev`` (like ``consul agent -dev``).

Data lives in a temporary folder that is removed on :meth:`LocalEtcd.stop`; the process is
stopped by its own pid. If the process that started it is killed (SIGKILL: no stop), etcd is
killed with it (``setpriv --pdeathsig``, util-linux), never left running on its own.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Collection
from pathlib import Path

from discovery.errors import ConfigError, RegistryUnavailable
from discovery.retry import poll

log = logging.getLogger(__name__)


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now: bound to port 0 together (the
    kernel may hand out a port just closed again, so one at a time two could be the same),
    read, closed; none of ``avoid`` (ports the caller is about to bind itself: free now, the
    kernel may hand them out too; after 20 tries, whatever came). Another process may take
    one before the caller binds it; on loopback that race is good enough."""
    for _ in range(20):
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                     for _ in range(count)]
            for s in socks:
                s.bind((host, 0))
            ports = [int(s.getsockname()[1]) for s in socks]
        if not set(ports) & set(avoid):
            break
    return ports


def listed_ports(*addresses: str) -> set[int]:
    """The ports ``addresses`` end in (``host:port``, ``service:port``; ``off``: none)."""
    return {int(tail) for a in addresses
            if (tail := a.rpartition(":")[2].strip()).isascii() and tail.isdigit()}


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port free on ``host`` right now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


class LocalEtcd:
    def __init__(self, binary: str = "etcd", host: str = "127.0.0.1",
                 avoid: Collection[int] = ()) -> None:
        found = shutil.which(binary)
        if found is None:
            raise ConfigError(f"--dev needs the etcd binary ({binary!r} not found; "
                              "apt-get install etcd-server)")
        self.binary, self.host = found, host
        self.client_port, self.peer_port = free_ports(2, host, avoid)
        self.data_dir = Path(tempfile.mkdtemp(prefix="discovery-dev-etcd-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, prefix: str = "/discovery") -> str:
        return f"etcd://{self.host}:{self.client_port}{prefix}"

    def start(self, timeout: float = 30.0) -> LocalEtcd:
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        argv = [self.binary, "--name", "dev", "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"dev={peer}", "--logger", "zap", "--log-level", "error"]
        setpriv = shutil.which("setpriv")  # start it from a thread that lives as long as we do
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        log_file = (self.data_dir / "etcd.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        if poll(self._answers, timeout=timeout, interval=0.05):
            log.info("dev etcd up at %s (data in %s)", self.url(""), self.data_dir)
            return self
        self.stop()
        raise RegistryUnavailable(f"dev etcd did not start within {timeout:g}s")

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RegistryUnavailable(f"dev etcd exited: {self.log_tail()}")
        try:
            with socket.create_connection((self.host, self.client_port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_tail(self) -> str:
        path = self.data_dir / "etcd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        log.info("dev etcd stopped and its data removed")
