"""discovery.agent.checks and discovery.agent.health: checks cannot starve each other."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from discovery.agent.checks import HttpCheck
from discovery.agent.health import CheckRunner, CheckScheduler, Workers
from discovery.agent.spec import PER_CONTAINER_CHECKS, CheckResult, CheckSpec
from tests.harness.util import wait_for
from tests.unit.test_checks import FakeAPI, exec_check, target
from tests.unit.test_checks_runner import OK, Scripted

# ---- limits (issue 8 §3): checks cannot starve each other ---------------------------------


def test_exec_never_starts_while_the_previous_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakeAPI(hang=True)
    probe = exec_check(api, timeout=0.1)
    assert probe.run().output.startswith("timed out after 0.1s")
    with caplog.at_level("INFO", logger="discovery.agent.checks"):
        for _ in range(3):  # the hung command is still running in the container
            assert probe.run() == CheckResult(False, "previous run still running: "
                                                     "not started again")
        assert [c[0] for c in api.calls] == ["create", "start"]  # no second exec
        skipped = [r for r in caplog.records if "previous run still running" in r.message]
        assert len(skipped) == 1 and skipped[0].levelname == "WARNING"
        assert "c0ffeec0ffee" in skipped[0].message and "check --now" in skipped[0].message
        api.hang = False  # the hung command ended
        assert probe.run() == CheckResult(True, "exit 0")
    assert [c[0] for c in api.calls] == ["create", "start", "create", "start"]
    assert sum("previous run ended" in r.message for r in caplog.records) == 1


def test_http_deadline_covers_the_whole_exchange() -> None:
    """A server trickling one byte every 50 ms never trips the socket timeout; the run still
    ends at its timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 1000:
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        started = time.monotonic()
        result = HttpCheck(CheckSpec(timeout=0.3), target(listener.getsockname()[1])).run()
        took = time.monotonic() - started
    finally:
        stop.set()
        server.join(2)
        listener.close()
    assert result == CheckResult(False, "timed out after 0.3s")
    assert 0.3 <= took < 0.6


class Gate:
    """A check that blocks until released, counting how many of its group run at once."""

    def __init__(self, group: dict[str, Any], release: threading.Event) -> None:
        self.group, self.release, self.runs = group, release, 0

    def run(self) -> CheckResult:
        with self.group["lock"]:
            self.group["active"] += 1
            self.group["max"] = max(self.group["max"], self.group["active"])
        self.release.wait(10)
        with self.group["lock"]:
            self.group["active"] -= 1
        self.runs += 1
        return CheckResult(False, "hung")


def test_one_container_holds_at_most_its_share_of_the_workers() -> None:
    assert PER_CONTAINER_CHECKS == 2
    scheduler = CheckScheduler(workers=8)
    release = threading.Event()
    hog: dict[str, Any] = {"lock": threading.Lock(), "active": 0, "max": 0}
    spec = CheckSpec(type="http", interval=60, timeout=60)
    gates = [Gate(hog, release) for _ in range(9)]  # one container, 9 ports, hung checks
    hogs = [CheckRunner(spec, g, lambda ok, r: None, name=f"hog-{n}", scheduler=scheduler,
                        group="hostile").start() for n, g in enumerate(gates)]
    other_ran = threading.Event()
    other: CheckRunner | None = None
    try:
        wait_for(lambda: hog["active"] == 2, timeout=2, message="two hung runs")
        started = time.monotonic()
        other = CheckRunner(CheckSpec(interval=0.05), Scripted([OK]),
                            lambda ok, r: other_ran.set(), name="other", scheduler=scheduler,
                            group="unrelated").start()
        assert other_ran.wait(2)
        assert time.monotonic() - started < 0.2  # not behind the hung container's queue
        wait_for(lambda: other.runs >= 5, timeout=2, message="the other keeps its interval")
        assert hog["max"] == 2 and sum(g.runs for g in gates) == 0
        release.set()  # the hung checks end: every port of the container gets its turn
        wait_for(lambda: all(g.runs >= 1 for g in gates), timeout=2, message="all 9 ran")
        assert hog["max"] == 2
    finally:
        release.set()
        for r in [*hogs, *([other] if other else [])]:
            r.stop()
        scheduler.stop()


def test_stopped_runners_give_their_share_back() -> None:
    scheduler = CheckScheduler(workers=4)
    release = threading.Event()
    hog: dict[str, Any] = {"lock": threading.Lock(), "active": 0, "max": 0}
    spec = CheckSpec(interval=60, timeout=60)
    old = [CheckRunner(spec, Gate(hog, release), lambda ok, r: None, scheduler=scheduler,
                       group="c1").start() for _ in range(5)]
    try:
        wait_for(lambda: hog["active"] == 2, timeout=2, message="two hung runs")
        for r in old:  # the container restarts: its runners are replaced
            r.stop()
        release.set()
        ran = threading.Event()
        new = CheckRunner(CheckSpec(interval=60), Scripted([OK]), lambda ok, r: ran.set(),
                          scheduler=scheduler, group="c1").start()
        assert ran.wait(2)  # the waiting, stopped runners did not keep the group's slots
        wait_for(lambda: not scheduler._busy and not scheduler._waiting, timeout=2,
                 message="every slot of c1 given back")
        assert sum(g.runs for g in (r.check for r in old) if isinstance(g, Gate)) == 2
        new.stop()
    finally:
        release.set()
        scheduler.stop()


def test_every_worker_is_started_with_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing the pool later started a thread inside submit(): at the host's pids limit it
    raised after queueing the run, which ended the timer loop (every check of the agent
    stopped). All workers now exist from the start, so a submit never starts one."""
    scheduler = CheckScheduler(workers=3)
    try:
        assert [t.is_alive() for t in scheduler._pool.threads] == [True] * 3

        def no_thread(*_: Any) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)  # the pids limit, from now
        ran = threading.Event()
        runner = CheckRunner(CheckSpec(interval=0.05), Scripted([OK] * 100),
                             lambda ok, r: ran.set(), scheduler=scheduler, group="c1")
        runner.start()
        assert ran.wait(5)
        wait_for(lambda: runner.runs >= 3, timeout=2, message="it keeps its interval")
        runner.stop()
    finally:
        monkeypatch.undo()
        scheduler.stop()


def test_a_hung_check_does_not_hold_the_agents_exit() -> None:
    """The interpreter joined a ThreadPoolExecutor's workers at exit: an agent whose checks
    hung on a tarpit outlived SIGTERM by their timeout (60 s: killed by the test's 15 s
    grace, and by ``docker stop``'s 10 s). The workers are daemon threads now."""
    script = textwrap.dedent("""
        import threading
        from discovery.agent.health import CheckRunner, CheckScheduler, Workers
        from discovery.agent.spec import CheckResult, CheckSpec
        hung = threading.Event()
        class Hung:
            def run(self):
                hung.set()
                threading.Event().wait(600)
                return CheckResult(True, "never")
        scheduler = CheckScheduler(workers=2)
        CheckRunner(CheckSpec(interval=0.05), Hung(), lambda ok, r: None,
                    scheduler=scheduler, group="c1").start()
        assert hung.wait(5)
        scheduler.stop()
        print("stopped", flush=True)
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, cwd=Path(__file__).parents[2])
    assert done.returncode == 0 and done.stdout == "stopped\n", done.stderr
    assert time.monotonic() - started < 10  # before: until the 600 s wait (the time-out above)


def test_a_run_that_raises_system_exit_leaves_its_worker_running() -> None:
    """A check plugin wrapping a CLI's main() may raise SystemExit: an executor's worker
    caught it; a thread of ours ended by it would be one worker fewer for good (eight such
    runs: no check of the agent ran again)."""
    workers = Workers(1, "t")
    try:
        workers.submit(sys.exit, 3)
        ran = threading.Event()
        workers.submit(ran.set)
        assert ran.wait(5) and workers.threads[0].is_alive()
    finally:
        workers.shutdown()
