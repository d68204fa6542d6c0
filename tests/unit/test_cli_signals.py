"""``discovery.cli.signals``: what a daemon command does with SIGTERM, SIGINT, SIGHUP and SIGUSR2,
also those that come during its start-up, before its handlers. Each case runs in a child
Python process of its own (handlers are process-wide), which signals itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = """
import logging, os, signal, sys, threading
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from discovery.cli.signals import Held, on_signals
done = threading.Event()
said = []
def says(what):
    def call():
        said.append(what)
        if what in ("stop", "leave"):
            done.set()
    return call
def settled():  # every handler's thread done (each signal is handled on one of its own)
    for t in threading.enumerate():
        if t.name.startswith("signal-"):
            t.join(10)
"""


def run(body: str) -> list[str]:
    """The child's printed lines (it exits 0 once stopped; killed, it fails the test)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def test_signals_of_the_start_up_are_handled_once_the_handlers_are_in_place() -> None:
    """A config push's SIGHUP or an upgrade's SIGUSR2 during start-up (the wait for a
    predecessor, the first read) ended the process by their default action."""
    out = run("""
        held = Held()
        for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGHUP):
            os.kill(os.getpid(), signum)
        print("started", flush=True)  # (a handler runs before the next bytecode: recorded)
        on_signals(says("stop"), says("reload"), says("leave"), held=held)
        assert done.wait(10)
        settled()
        print("said", sorted(said))
    """)
    assert out[0] == "started"  # alive after the three, which came before
    assert out[-1] == "said ['leave', 'reload', 'reload']"


def test_a_command_without_reload_or_leave_survives_sighup_and_sigusr2() -> None:
    """``discovery dns`` has nothing to reload, ``discovery agent`` no successor to leave
    for: each signal is logged and ignored (a systemctl reload killed ``discovery dns``, and
    systemd counts an exit on SIGHUP as clean: not restarted)."""
    out = run("""
        on_signals(says("stop"))
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR2)
        settled()
        print("alive", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert done.wait(10)
        print("said", said)
    """)
    assert "alive" in out and out[-1] == "said ['stop']"
    assert any("nothing to reload here: ignored" in line for line in out)
    assert any("not used by this command: ignored" in line for line in out)
