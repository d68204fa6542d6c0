"""Runtime API, master CLI and supervisor against a real HAProxy 2.6 on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from discovery.errors import HAProxyCommandError, HAProxyError, RenderError
from discovery.watcher.haproxy import HAProxyMaster, HAProxyRuntime
from discovery.watcher.slots import Slot
from discovery.watcher.supervisor import ExternalHAProxy, HAProxySupervisor, validate_config
from tests.harness.haproxy import (  # the fixtures come from tests/conftest.py's plugins
    HAPROXY_BIN,
    build_config,
    http_get,
)
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration


def names_seen(port: int, n: int) -> Counter[str]:
    """Send ``n`` requests (new connection each); count the answering backends' names."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = http_get(port)
        seen[body if status == 200 else f"HTTP {status}"] += 1
    return seen


@pytest.fixture
def two(http_backends, haproxy_factory):
    """HAProxy with backend ``be`` (4 empty slots) on a free port, and backends a, b."""
    a, b = http_backends("alpha", "beta")
    port = free_port()
    return haproxy_factory(build_config(port, {"be": 4})), port, a, b


def test_slots_route_traffic_without_reload(two):
    sup, port, a, b = two
    rt = sup.runtime
    assert names_seen(port, 2) == {"HTTP 503": 2}  # every slot starts in maint
    rt.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 100, "ready")]})
    assert names_seen(port, 10) == {"alpha": 10}
    assert rt.slots("be")["s1"].matches(Slot("s1", "127.0.0.1", a.port, 100, "ready"))
    rt.apply_slots({"be": [Slot("s3", "127.0.0.1", b.port, 100, "ready")]})
    assert names_seen(port, 10) == {"alpha": 5, "beta": 5}
    rt.apply_slots({"be": [Slot("s1")]})  # instance gone: slot back to maint
    assert names_seen(port, 10) == {"beta": 10}
    s1 = rt.slots("be")["s1"]
    assert (s1.state, s1.address, s1.port, s1.weight) == ("maint", "127.0.0.1", 1, 0)
    assert sup.reload_count() == 0


def test_drain_stops_new_requests(two):
    sup, port, a, b = two
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 10, "ready"),
                                    Slot("s2", "127.0.0.1", b.port, 10, "ready")]})
    assert names_seen(port, 10) == {"alpha": 5, "beta": 5}
    sup.runtime.apply_slots({"be": [Slot("s2", "127.0.0.1", b.port, 10, "drain")]})
    view = sup.runtime.slots("be")["s2"]
    assert (view.state, view.operational) == ("drain", "running")
    assert names_seen(port, 10) == {"alpha": 10}
    sup.runtime.apply_slots({"be": [Slot("s2", "127.0.0.1", b.port, 10, "ready")]})
    assert names_seen(port, 10) == {"alpha": 5, "beta": 5}
    assert sup.reload_count() == 0


def test_weights_split_traffic(two):
    sup, port, a, b = two
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 1, "ready"),
                                    Slot("s2", "127.0.0.1", b.port, 3, "ready")]})
    seen = names_seen(port, 40)
    assert abs(seen["alpha"] - 10) <= 2 and seen["alpha"] + seen["beta"] == 40, seen
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 3, "ready"),
                                    Slot("s2", "127.0.0.1", b.port, 1, "ready")]})
    assert sup.runtime.slots("be")["s1"].weight == 3
    seen = names_seen(port, 40)
    assert abs(seen["beta"] - 10) <= 2 and seen["alpha"] + seen["beta"] == 40, seen
    sup.runtime.apply_slots({"be": [Slot("s2", "127.0.0.1", b.port, 0, "ready")]})
    assert names_seen(port, 8) == {"alpha": 8}  # weight 0 takes no new requests
    assert sup.reload_count() == 0


def test_command_errors(two, tmp_path):
    sup, _port, _a, _b = two
    rt = sup.runtime
    cases = {"set server be/s9 state ready": "No such server",
             "set server nob/s1 state ready": "No such backend",
             "set server be state ready": "Require 'backend/server'",
             "set server be/s1 weight 300": "between 0 and 256",
             "set server be/s1 addr notanip port 80": "Invalid addr",
             "show servers state nob": "Can't find backend",
             "frobnicate": "Unknown command"}
    for cmd, why in cases.items():
        with pytest.raises(HAProxyError, match=why) as info:
            rt.command(cmd)
        assert cmd in str(info.value)
    with pytest.raises(HAProxyError, match="control character"):
        rt.command("set server be/s1 weight 5; set server be/s2 weight 5")
    with pytest.raises(HAProxyError, match="control character"):
        rt.commands(["show info", "set server be/s1 weight 5\nshutdown frontend fe"])
    assert rt.slots("be")["s1"].weight == 1  # nothing of the above was sent
    with pytest.raises(HAProxyError, match=r"not in 1\.\.65535"):
        rt.apply_slots({"be": [Slot("s1", "127.0.0.1", 99999, 1, "ready")]})
    # one batch: bad commands are reported, the good ones still ran
    with pytest.raises(HAProxyCommandError) as batch:
        rt.commands(["set server be/s9 weight 2", "set server be/s1 weight 7",
                     "set server nob/s1 weight 2"])
    assert [c for c, _ in batch.value.failures] == ["set server be/s9 weight 2",
                                                    "set server nob/s1 weight 2"]
    assert rt.slots("be")["s1"].weight == 7
    # sent at once, answers read after: each answer and each refusal is still its command's
    port = free_port()
    sent = ["set server be/s9 weight 2", f"set server be/s2 addr 127.0.0.2 port {port}",
            "set server be/s1 weight 9", "show servers state be", "set server nob/s1 weight 2",
            "set server be/s1 weight 8"]
    with pytest.raises(HAProxyCommandError) as batch:
        rt.commands(sent, batch=len(sent))
    answers = batch.value.answers
    assert [c for c, _ in batch.value.failures] == [sent[0], sent[4]]
    assert "No such server" in answers[0] and "No such backend" in answers[4]
    assert "changed from" in answers[1] and answers[2] == answers[5] == ""
    assert f"127.0.0.2 {port}" not in answers[0] + answers[4] and "be s2" not in answers[1]
    assert {ln.split()[3] for ln in answers[3].splitlines()[2:]} >= {"s1", "s2"}  # srv_name
    assert rt.slots("be")["s1"].weight == 8 and rt.slots("be")["s2"].port == port
    with pytest.raises(HAProxyError, match="cannot reach"):
        HAProxyRuntime(str(tmp_path / "nothing.sock")).command("show info")
    with pytest.raises(HAProxyError, match="Unknown command"):
        sup.master.command("frobnicate")


def test_batch_of_many_slots_is_fast(http_backends, haproxy_factory):
    (a,) = http_backends("alpha")
    port = free_port()
    sup = haproxy_factory(build_config(port, {"b1": 64, "b2": 64}))
    changes = {be: [Slot(f"s{i}", "127.0.0.1", a.port, i, "ready") for i in range(1, 65)]
               for be in ("b1", "b2")}
    started = time.monotonic()
    cmds = sup.runtime.apply_slots(changes)
    took = time.monotonic() - started
    print(f"\napplied {len(cmds)} commands in one connection: {took * 1000:.1f} ms")
    assert len(cmds) == 384 and took < 5.0
    views = sup.runtime.servers()
    assert all(views[(be, s.name)].matches(s) for be, slots in changes.items() for s in slots)


def test_stat_of_one_backend_reads_only_its_servers(haproxy_factory):
    """A sync that reuses a freed slot asks for that backend's sessions only (router._Busy):
    every backend's ``show stat`` took ~0.5 s a sync at 1,000 services (bench/scale.py)."""
    sup = haproxy_factory(build_config(free_port(), {"b1": 3, "b2": 2, "7": 1}))
    assert {k for k in sup.runtime.stat("b2")} == {("b2", "s1"), ("b2", "s2")}
    assert {be for be, _ in sup.runtime.stat()} == {"b1", "b2", "7"}
    assert {be for be, _ in sup.runtime.stat("7")} == {"b1", "b2", "7"}  # a number: a proxy id
    assert {be for be, _ in sup.runtime.stat("b1 4 -1;x")} == {"b1", "b2", "7"}  # not a name


def test_reload_is_seamless(http_backends, haproxy_factory):
    (a,) = http_backends("alpha")
    port = free_port()
    sup = haproxy_factory(build_config(port, {"be": 2},
                                       servers={"be": [f"server live 127.0.0.1:{a.port}"]}))
    stop = threading.Event()
    results: Counter[str] = Counter()
    errors: list[str] = []

    def client() -> None:  # bounded: <= 2000 requests or 10 s, one connection each
        deadline = time.monotonic() + 10
        while not stop.is_set() and results.total() < 2000 and time.monotonic() < deadline:
            try:
                status, body = http_get(port, timeout=2)
                results["ok" if (status, body) == (200, "alpha") else "bad"] += 1
                if (status, body) != (200, "alpha"):
                    errors.append(f"{status} {body[:60]}")
            except OSError as exc:
                results["failed"] += 1
                errors.append(repr(exc))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    wait_for(lambda: results.total() >= 20, 5, message="client loop running")
    durations, pids = [], {sup.master.worker_pids()[0]}
    for n in range(1, 6):
        before = sup.reload_count()
        started = time.monotonic()
        sup.reload()
        durations.append(time.monotonic() - started)
        assert sup.reload_count() == before + 1 == n
        pids.add(sup.runtime.pid())
        time.sleep(0.15)  # pacing: requests run between the reloads (nothing is waited for)
    stop.set()
    thread.join(15)
    print(f"\nreloads: {[f'{d * 1000:.0f} ms' for d in durations]}; requests {dict(results)}")
    assert len(pids) == 6  # every reload brought a new worker
    assert results["ok"] >= 100
    assert results["failed"] == 0 and results["bad"] == 0, errors[:5]


def test_runtime_state_across_reload(http_backends, haproxy_factory):
    """What survives a reload in 2.6: nothing without a state file; with one, admin state,
    weight and port, but the address only when the config line names a host."""
    (a,) = http_backends("alpha")
    port = free_port()
    cfg = build_config(port, {"be": 1}, state_file=True,
                       servers={"be": ["server h1 localhost:1 disabled"]})
    sup = haproxy_factory(cfg)
    want = {n: Slot(n, "127.0.0.2", a.port, 7, "drain") for n in ("s1", "h1")}
    sup.runtime.apply_slots({"be": list(want.values())})
    sup.reload()  # no state dumped (the file doesn't exist): config state again
    assert {v.state for v in sup.runtime.slots("be").values()} == {"maint"}
    sup.runtime.apply_slots({"be": list(want.values())})
    sup.server_state_file = sup.state_dir / "server-state"
    sup.reload()  # dumps `show servers state` first
    now = sup.runtime.slots("be")
    assert now["h1"].matches(want["h1"])  # `server h1 localhost:1`: everything restored
    s1 = now["s1"]  # `server s1 127.0.0.1:1`: state, weight, port restored; address NOT
    assert (s1.state, s1.weight, s1.port, s1.address) == ("drain", 7, a.port, "127.0.0.1")


def test_failed_reload_keeps_old_worker(two):
    sup, port, a, _b = two
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 1, "ready")]})
    good = sup.config.read_text()
    sup.config.write_text(good + "backend broken\n    server x\n")
    old = sup.runtime.pid()
    with pytest.raises(HAProxyError, match="reload failed"):
        sup.reload()
    assert sup.runtime.pid() == old and names_seen(port, 3) == {"alpha": 3}
    proc = sup.master.show_proc()
    assert (proc.master.reloads, proc.master.failed) == (1, 1)
    sup.config.write_text(good)
    sup.reload()
    assert sup.reload_count() == 2 and sup.master.show_proc().master.failed == 0


def test_validate_config(tmp_path):
    good = tmp_path / "good.cfg"
    good.write_text(build_config(free_port()).replace("{state_dir}", str(tmp_path)))
    validate_config(HAPROXY_BIN, good)
    bad = tmp_path / "bad.cfg"
    bad.write_text(good.read_text() + "backend broken\n    server x\n    balance nonsense\n")
    with pytest.raises(RenderError) as info:
        validate_config(HAPROXY_BIN, bad)
    msg = str(info.value)
    assert "bad.cfg" in msg and "'server' expects <name> and <addr>" in msg, msg
    with pytest.raises(HAProxyError):
        validate_config(str(tmp_path / "no-haproxy"), good)


def test_start_failure_is_reported(haproxy_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HAProxyError, match="exited with code") as info:
            haproxy_factory(build_config(port))
    assert "cannot bind socket" in str(info.value) or "Address already in use" in str(
        info.value), info.value
    with pytest.raises(RenderError):
        haproxy_factory("global\n    nonsense here\n")


def test_a_new_haproxy_checks_its_config_itself(tmp_path):
    """Nothing runs on the state dir: the start runs no ``haproxy -c`` first (HAProxy parses
    the config as it starts; ~0.2 s at 1,000 services). A start that would take over a
    running one checks first."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "haproxy"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec {HAPROXY_BIN} "$@"\n')
    wrapper.chmod(0o755)
    state = tmp_path / "run"
    state.mkdir()
    config = tmp_path / "haproxy.cfg"
    port = free_port()
    config.write_text(build_config(port).replace("{state_dir}", str(state)))
    first = HAProxySupervisor(config, state, str(wrapper))
    second = HAProxySupervisor(config, state, str(wrapper))
    try:
        assert first.nothing_here()
        first.start()
        assert calls.read_text().split() == ["-W"]
        assert not second.nothing_here()
        second.start()  # takes the sockets over from first's
        assert calls.read_text().split() == ["-W", "-c", "-W"]
    finally:
        for sup in (second, first):
            with contextlib.suppress(Exception):
                sup.stop()


def test_restart_after_master_killed(two):
    sup, port, a, _b = two
    restarted = threading.Event()
    sup.on_restart = restarted.set
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 1, "ready")]})
    old_master, old_worker = sup.master_pid, sup.runtime.pid()
    assert old_master is not None
    os.kill(old_master, signal.SIGKILL)
    assert restarted.wait(15), sup.log_tail()
    assert sup.restarts == 1 and sup.master_pid not in (None, old_master)
    assert sup.runtime.pid() != old_worker
    assert sup.runtime.slots("be")["s1"].state == "maint"  # runtime state is gone
    sup.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 1, "ready")]})
    assert names_seen(port, 3) == {"alpha": 3}
    assert sup.reload_count() == 0  # a new master counts from 0
    sup.reload()
    assert sup.reload_count() == 1


def test_stop_stops_everything(two):
    sup, port, _a, _b = two
    master, worker = sup.master_pid, sup.runtime.pid()
    assert master is not None
    sup.stop()
    assert not sup.running
    for pid in (master, worker):
        wait_for(lambda p=pid: not Path(f"/proc/{p}").exists() or
                 "Z" in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3], 10,
                 message=f"pid {pid} gone")
    with pytest.raises(OSError):
        http_get(port, timeout=1)


def test_external_haproxy(two):
    sup, port, a, _b = two
    ext = ExternalHAProxy(sup.admin_socket, master_socket=sup.master_socket)
    ext.runtime.apply_slots({"be": [Slot("s1", "127.0.0.1", a.port, 1, "ready")]})
    assert names_seen(port, 2) == {"alpha": 2}
    ext.reload()
    assert ext.reload_count() == 1
    master_pid = sup.master_pid
    assert master_pid is not None
    by_cmd = ExternalHAProxy(sup.admin_socket, reload_cmd=["kill", "-USR2", str(master_pid)])
    old = by_cmd.runtime.pid()
    by_cmd.reload()
    assert by_cmd.runtime.pid() != old and by_cmd.reload_count() == 1
    assert HAProxyMaster(str(sup.master_socket)).reload_count() == 2
    failing = ExternalHAProxy(sup.admin_socket, reload_cmd=["false"])
    with pytest.raises(HAProxyError, match="exited 1"):
        failing.reload()
    with pytest.raises(HAProxyError):
        ExternalHAProxy(sup.admin_socket)
    ext.stop()  # not ours: still running
    assert sup.running
