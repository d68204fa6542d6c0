"""Tiny helpers shared by every test, the demo and the benchmarks (no pytest import)."""

from __future__ import annotations

import importlib.util
import random
import shutil
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from discovery.registry.devserver import free_port as _kernel_port

T = TypeVar("T")

__all__ = ["free_port", "load_script", "require_tool", "server_ports", "wait_for"]

#: the ports free_port() handed out lately in this process: the kernel may give a port just
#: closed again, and two of a test's ports were once the same (the watcher refused its
#: config: "services.web.port: 127.0.0.1:42427 is already used by services.db")
_HANDED_OUT: deque[int] = deque(maxlen=4096)


#: where free_port() picks: below Linux's ephemeral range (32768-60999), where every outgoing
#: connection takes its own port (from the kernel's pick, an agent's HTTP port was once taken
#: so between the pick and its listen: "Address already in use", 1 test of 2,847), and above
#: server_ports()'s span
TEST_PORTS = (24000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, in :data:`TEST_PORTS`, never one this process
    was given lately (the kernel's pick, as ``up --dev`` makes it, if none is found)."""
    for _ in range(1000):
        port = random.randrange(*TEST_PORTS)
        if port not in _HANDED_OUT and _free(host, port):
            _HANDED_OUT.append(port)
            return port
    for _ in range(100):
        port = _kernel_port(host)
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise RuntimeError(f"no free port on {host} that this process was not given lately")


def load_script(path: Path) -> ModuleType:
    """A script outside the package (``scripts/``, ``bench/``) as a module, named after its
    file, without putting its folder on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

#: where :func:`server_ports` picks registry members' ports: below Linux's ephemeral range
#: (32768-60999), which is where free_port() and every outgoing connection's own port come
#: from; between the fleet bench's relay block (from 12000) and bench/scale.py's backends
#: (from 20000)
SERVER_PORTS = (16000, 20000)


def server_ports(count: int, host: str = "127.0.0.1",
                 span: tuple[int, int] = SERVER_PORTS) -> list[int]:
    """``count`` distinct ports free on ``host`` now, for servers a test restarts on the same
    port (registry members). A port from free_port() is in the ephemeral range: while its
    member is down an outgoing connection may take it as its own port, and the member cannot
    come back (ZooKeeper exits 14). Ports here are never given to outgoing connections.
    Picked at random within ``span`` (two clusters started one after the other differ)."""
    picked: list[int] = []
    for _ in range(100 * count):
        port = random.randrange(*span)
        if port in picked or not _free(host, port):
            continue
        picked.append(port)
        if len(picked) == count:
            return picked
    raise RuntimeError(f"only {len(picked)} free ports in {span} on {host}, need {count}")


def _free(host: str, port: int) -> bool:
    """Whether a TCP socket can bind ``host``:``port`` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def require_tool(name: str, package: str) -> str:
    """The path of the program ``name`` (a name on PATH or a path); when it is missing the test
    *fails* (never skips): scripts/setup.sh, run by ``make test``, installs Debian ``package``,
    so a missing tool is a broken set-up, not a reason to test less."""
    path = shutil.which(name)
    if path is None:
        import pytest  # here, not at the top: the demo and the benchmarks run without pytest

        pytest.fail(f"{name} is missing: run scripts/setup.sh (apt-get install {package})",
                    pytrace=False)
    return path


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Exceptions raised by ``predicate`` count as "not yet" (the last one is chained to the
    error). Raises ``AssertionError`` with ``message`` if nothing truthy came back within
    ``timeout`` seconds. The predicate is always called at least once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if value:
                return value
            last_value = value
            last_exc = None
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"last error: {last_exc!r}" if last_exc is not None else f"last value: {last_value!r}"
    text = f"timed out after {timeout:g}s waiting for {message or 'condition'} ({detail})"
    raise AssertionError(text) from last_exc


def dns_tcp_reply(sock: socket.socket) -> bytes:
    """One DNS-over-TCP message from ``sock``: its 2-byte length, then that many bytes, read
    until all have come (``MSG_WAITALL`` does not wait on a socket with a timeout: a reply
    of 32 KB came back cut short)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    return exactly(struct.unpack(">H", exactly(2))[0])
