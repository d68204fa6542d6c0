"""An HAProxy that keeps dying right after its start is restarted with a growing wait, not in a
loop: real HAProxy 2.6 on loopback, each new worker SIGKILLed (by pid) the moment it appears."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest

from discovery.watcher.supervisor import HAProxySupervisor
from tests.harness.haproxy import (  # the fixtures come from tests/conftest.py's plugins
    build_config,
    http_get,
)
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration
LOGGER = "discovery.watcher.supervisor"


def kill_each_worker(sup: HAProxySupervisor, seconds: float) -> int:
    """For ``seconds``: SIGKILL every worker of the supervisor's master as soon as it shows
    (the master of HAProxy 2.6 then exits too). How many were killed."""
    killed, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        master = sup.master_pid
        if master is not None:
            with contextlib.suppress(OSError, ValueError):
                for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
        time.sleep(0.01)
    return killed


def serving(port: int) -> bool:
    try:
        return http_get(port, timeout=1) == (200, "alpha")
    except OSError:
        return False


def starts(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [r.created for r in caplog.records if r.getMessage().startswith("started HAProxy")]


def waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"restarting it in ([\d.]+) s", r.getMessage()) for r in caplog.records)
    return [float(m.group(1)) for m in found if m]


@pytest.fixture
def live(http_backends, haproxy_factory):
    """``make(**supervisor_kwargs)``: a started supervisor routing to "alpha"; its port."""
    (a,) = http_backends("alpha")

    def make(**kwargs: object) -> tuple[HAProxySupervisor, int]:
        port = free_port()
        config = build_config(port, servers={"be": [f"server live 127.0.0.1:{a.port}"]})
        return haproxy_factory(config, **kwargs), port

    return make


def test_crash_loop_restarts_with_growing_waits(live, caplog):
    """Before: 4 s of each new worker killed at once meant 23-26 starts here (194 in 10 s with a
    slower killer), each re-applying every slot; now the first quick death restarts at once,
    the next ones after 0.2, 0.4, 0.8, 1.6 s...: 5 starts."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup, port = live()
    caplog.clear()
    killed = kill_each_worker(sup, 4.0)
    times = starts(caplog)
    print(f"\n4 s of killing each new worker: {killed} killed, {len(times)} HAProxy starts, "
          f"{sup.restarts} restarts; waits logged {waits(caplog)}")
    assert 3 <= len(times) <= 8, caplog.text  # it keeps restarting, but not in a loop
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[-1] >= 0.8, gaps  # the wait grows
    logged = waits(caplog)
    assert logged == pytest.approx([0.2 * 2 ** i for i in range(len(logged))]), logged
    assert len(logged) >= 3, logged
    wait_for(lambda: serving(port), 15, interval=0.05, message="serving once the crashes stop")


def test_first_death_and_a_long_lived_masters_death_restart_at_once(live, caplog):
    """A single crash (also of a master just started) and the first death of a master that
    lasted ``stable_after`` seconds are restarted at once: the wait starts over."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup, port = live(stable_after=1.5)
    kill_each_worker(sup, 2.0)  # restarts at once, then after 0.2 s, 0.4 s...
    assert waits(caplog)[:2] == [0.2, 0.4], caplog.text
    wait_for(lambda: serving(port), 10, interval=0.05, message="serving once the crashes stop")
    time.sleep(1.6)  # the master now lasted stable_after
    caplog.clear()
    worker = sup.runtime.pid()
    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: sup.runtime.pid() != worker and serving(port), 1.0, interval=0.002,
             message="serving again within 1 s")
    took = time.monotonic() - killed
    assert waits(caplog) == [], caplog.text
    print(f"\nlong-lived worker SIGKILL -> first 200: {took * 1000:.0f} ms")


def test_stop_cuts_a_crash_wait_short(live, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup, _port = live(crash_backoff=(30.0, 60.0))
    deadline = time.monotonic() + 10
    while waits(caplog) != [30.0] and time.monotonic() < deadline:
        kill_each_worker(sup, 0.1)  # the first death restarts at once, the second waits
    assert waits(caplog) == [30.0], caplog.text
    assert sup.master_pid is None
    began = time.monotonic()
    sup.stop()
    assert time.monotonic() - began < 2.0
    assert sup.master_pid is None and len(starts(caplog)) == 2  # no start after the stop
