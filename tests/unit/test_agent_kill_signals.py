"""Which ``kill`` events drain a container (agent/tracked.py: :func:`terminating`).

Docker's kill event gives the signal as a number. Before, a fixed set of names and numbers
(KILL, TERM, INT, QUIT) drained: ``docker stop`` of a container whose stop signal is another
(httpd's SIGWINCH, 28; systemd's SIGRTMIN+3) left it ``up`` while it shut down, until its
``die`` (requests dropped), and ``docker kill -s QUIT`` (a JVM's thread dump) took a Java
container out of rotation for the kill's grace (60 s). Now: SIGKILL, SIGTERM, SIGINT, or the
container's own stop signal (``Config.StopSignal``, by name or number).
"""

from __future__ import annotations

import signal

import pytest

from discovery.agent.tracked import signal_number, stop_signal_of, terminating
from tests.unit.test_agent_docker import Setup, later, setup  # noqa: F401  (the fixture)

KEY = ("xsvc", "n1:" + "x" * 12 + ":80")
DRAINED = [("put", KEY, "draining"), ("delete", KEY)]


def killed(made: Setup, stop_signal: str | None, sig: str) -> list[tuple[object, ...]]:
    """The writes of a kill event with ``sig`` of a registered container whose
    ``Config.StopSignal`` is ``stop_signal`` (None: none given, SIGTERM)."""
    x = made.run("x", "xsvc")
    if stop_signal is not None:
        x["Config"]["StopSignal"] = stop_signal
    made.agent._on_sync(list(made.docker.running.values()))
    made.wait_services(["xsvc"])
    written = len(made.registry.log)
    made.event("kill", x, later(x), signal=sig)
    return made.registry.log[written:]


@pytest.mark.parametrize(("stop_signal", "sig"), [
    ("SIGWINCH", "28"),  # httpd's image: docker stop
    ("WINCH", "28"), ("28", "28"), ("sigwinch", "28"),
    ("SIGRTMIN+3", "37"),  # systemd in a container
    ("SIGQUIT", "3"),  # nginx's image: docker stop
    (None, "15"), ("SIGWINCH", "15"), (None, "9"), ("SIGWINCH", "9"), (None, "2"),
    (None, ""),  # no signal given: drained, as before
])
def test_a_kill_with_its_stop_signal_or_an_ending_one_drains(
        setup: Setup, stop_signal: str | None, sig: str) -> None:  # noqa: F811
    assert killed(setup, stop_signal, sig) == DRAINED
    setup.agent._killed.clear()  # its grace's thread ends


@pytest.mark.parametrize(("stop_signal", "sig"), [
    (None, "3"),  # docker kill -s QUIT: a JVM's thread dump, it goes on serving
    (None, "1"), (None, "28"), ("SIGQUIT", "1"), ("SIGRTMIN+3", "38"), (None, "10"),
])
def test_any_other_signal_leaves_it_registered(
        setup: Setup, stop_signal: str | None, sig: str) -> None:  # noqa: F811
    assert killed(setup, stop_signal, sig) == []
    assert setup.services() == ["xsvc"]


@pytest.mark.parametrize(("given", "number"), [
    ("SIGTERM", 15), ("term", 15), (" 15 ", 15), ("SIGRTMIN", 34), ("RTMIN+3", 37),
    ("SIGRTMAX-1", 63), ("SIGRTMAX", 64), ("SIGIOT", 6), (9, 9),
    ("", None), ("0", None), ("65", None), ("RTMIN-1", None), ("RTMAX+1", None), ("SIGFOO", None),
    ("1" * 5000, None), ("\u0661", None), ("SIG", None), ("RTMIN+300", None),
])
def test_signal_numbers_as_docker_gives_them(given: object, number: int | None) -> None:
    assert signal_number(given) == number


def test_the_stop_signal_defaults_to_sigterm() -> None:
    assert stop_signal_of({}) == stop_signal_of({"Config": None}) == signal.SIGTERM
    assert stop_signal_of({"Config": {"StopSignal": ""}}) == signal.SIGTERM
    assert stop_signal_of({"Config": {"StopSignal": "bogus"}}) == signal.SIGTERM
    assert stop_signal_of({"Config": {"StopSignal": "SIGWINCH"}}) == signal.SIGWINCH
    assert terminating("not a signal", signal.SIGTERM)  # unknown: drained, as before
