"""Rendering the HAProxy config: the server-state file across a real HAProxy reload."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from discovery.model import State
from discovery.watcher.config import ServiceConfig, WatcherConfig
from discovery.watcher.render import Renderer, RuntimePaths, build_context
from discovery.watcher.slots import Slot
from tests.harness.util import free_port, require_tool, wait_for
from tests.unit.test_render import inst

# --- a real HAProxy: drain survives a reload; a stale state file wins over the config ---


def admin(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)  # the master CLI answers only then
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def servers(sock: Path) -> dict[str, tuple[str, int, str]]:
    """srv_name -> (addr, port, status) for backend web."""
    rows = [line.split() for line in admin(sock, "show servers state web").splitlines()[2:]]
    state = {f[3]: (f[4], int(f[18])) for f in rows if len(f) > 18}
    stats = [line.split(",") for line in admin(sock, "show stat").splitlines()]
    status = {f[1]: f[17] for f in stats if len(f) > 17 and f[0] == "web"}
    return {name: (*state[name], status[name]) for name in state}


def worker_pid(sock: Path) -> str:
    return next(line for line in admin(sock, "show info").splitlines() if line.startswith("Pid:"))


def test_reload_with_state_file(tmp_path: Path) -> None:
    """Why every reload renders each slot's current address and never relies on the
    server-state file: HAProxy 2.6 lets a stale state line win over the new config."""
    paths = RuntimePaths(tmp_path / "admin.sock", tmp_path / "state")
    cfg = WatcherConfig(services={"web": ServiceConfig("web", free_port())})
    a, b, c, d = (inst("web", n, port=20000 + n) for n in (1, 2, 3, 4))
    before = [Slot.of("s1", a), Slot.of("s2", b), Slot("s3"), Slot("s4")]
    # after: a left s1, b drains, c took s3 at runtime; then d arrives and (e.g. in a fresh,
    # bigger table) is given the freed s1
    after = [Slot.of("s1", d), Slot.of("s2", b.with_state(State.DRAINING)), Slot.of("s3", c),
             Slot("s4")]  # fmt: skip
    renderer = Renderer()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(renderer.render(build_context(cfg, {"web": before}, paths)))
    master = tmp_path / "master.sock"
    argv = [require_tool("haproxy", "haproxy"), "-W", "-S", f"{master},mode,600", "-f", str(conf)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        sock = Path(paths.admin_socket)
        pid = wait_for(lambda: "master" in admin(master, "show proc") and worker_pid(sock), 10,
                       message="HAProxy master and worker up")
        # runtime, as the watcher would do it
        for cmd in ("set server web/s1 state maint", "set server web/s2 state drain",
                    "set server web/s3 addr 192.0.2.3 port 20003", "set weight web/s3 100",
                    "set server web/s3 state ready"):  # fmt: skip
            admin(sock, cmd)
        ctx = build_context(cfg, {"web": after}, paths)
        dump = admin(sock, "show servers state")
        Path(str(paths.state_file)).write_text(dump)
        conf.write_text(renderer.render(ctx))
        admin(master, "reload")
        wait_for(lambda: worker_pid(sock) != pid, 10, message="a new worker after the reload")
        got = wait_for(lambda: servers(sock), 10, message="the servers' state")
        assert got["s2"] == ("192.0.2.2", 20002, "DRAIN")  # weight 0 in the config: still drained
        assert got["s3"] == ("192.0.2.3", 20003, "no check")
        # HAProxy 2.6 lets the stale state win: in maint, and the *old* port
        assert got["s1"] == ("192.0.2.4", 20001, "MAINT")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        print(err.decode(errors="replace"))
