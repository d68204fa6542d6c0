"""``bench/fleet_greenlets.py``'s wait for a socket, which replaces ``zk_io._poll`` in a greenlet
worker: the answers kazoo's ``selector_select`` gives, a wait that lets other greenlets run, and
a time-out that is as long as asked after a busy turn.
In a process of its own, since importing it makes the whole standard library cooperative."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

CHECKS = textwrap.dedent("""
    import socket, sys, time
    sys.path.insert(0, sys.argv[1])
    import fleet_greenlets as g
    import gevent
    from discovery.registry import zk_io

    assert zk_io._poll is g.poll
    a, b = socket.socketpair()
    t0 = time.monotonic()
    assert g.poll([a], [], [], 0.05) == ([], [], [])  # nothing to read: the time-out
    assert time.monotonic() - t0 >= 0.045
    end = time.monotonic() + 0.2
    while time.monotonic() < end:  # busy without yielding: the hub's clock goes stale
        pass
    t0 = time.monotonic()
    assert g.poll([a], [], [], 0.1) == ([], [], [])
    assert time.monotonic() - t0 >= 0.095  # timed from now (before: it returned at once)
    from kazoo.handlers.utils import selector_select

    def kazoo(r, w):  # what zk_io._poll answered before: kazoo's selector over poll
        return selector_select(r, w, [], 0, selectors_module=zk_io._PollSelectors)

    assert g.poll([a], [a], [], 0) == kazoo([a], [a]) == ([], [a, a], [])  # kazoo's quirk
    assert g.poll([], [a], [], 0) == kazoo([], [a]) == ([], [a], [])  # writable
    ran = []
    gevent.spawn(ran.append, "other")
    gevent.spawn_later(0.02, b.send, b"x")
    t0 = time.monotonic()
    assert g.poll([a], [], [], 5.0) == ([a], [], [])  # woken by the send, not the time-out
    assert time.monotonic() - t0 < 1.0 and ran == ["other"]  # the others ran meanwhile
    assert g.poll([a.fileno()], [], [], None) == ([a.fileno()], [], [])  # an fd will do
    a.recv(1)
    b.send(b"y")
    assert g.poll([a], [a], [], 0) == kazoo([a], [a]) == ([a, a], [], [])  # readable first
    a.recv(1)
    b.close()
    assert g.poll([a], [], [], 1.0) == kazoo([a], []) == ([a], [], [])  # hung up: readable
    print("ok")
""")


def test_greenlet_poll_answers_as_kazoo_and_yields() -> None:
    out = subprocess.run([sys.executable, "-c", CHECKS, str(BENCH)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
