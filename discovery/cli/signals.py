"""One way for a daemon command to take SIGTERM/SIGINT (stop), SIGHUP (reload) and SIGUSR2
(leave: exit, leaving HAProxy — and with ``up`` the registrations — for a successor, which also
takes the DNS/HTTP listening sockets over: :mod:`discovery.lookup.handover`)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


#: SIGTERM and SIGINT still end a start-up at once (nothing to drain yet; and a test that runs a
#: command in-process and sees it fail keeps its Ctrl-C)
HELD = (signal.SIGHUP, signal.SIGUSR2)


class Held:
    """The SIGHUP and SIGUSR2 a daemon command receives before :func:`on_signals` (its
    start-up: the wait for a predecessor, the registry's first read), recorded, then handled
    there as they would have been: their default action ended the process (a config push's
    SIGHUP, an upgrade's SIGUSR2; systemd counts an exit on SIGHUP as clean, so it is not
    restarted). Made first thing in the command, on the main thread."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        for signum in HELD:
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.pending.append(signum)  # (atomic; read once the real handlers are in place)


def on_signals(stop: Callable[[], None], reload: Callable[[], None] | None = None,
               leave: Callable[[], None] | None = None, held: Held | None = None) -> None:
    """Call ``stop`` on SIGTERM or SIGINT, ``reload`` on SIGHUP, and ``leave`` on SIGUSR2;
    without ``reload`` or ``leave`` that signal is logged and ignored (its default action
    ended the process: ``discovery dns`` died at any ``systemctl reload``). What ``held``
    recorded before is handled now, in order.

    The callbacks run on a thread of their own, never inside the handler: a handler runs on
    the main thread between bytecodes, possibly while that thread holds the very lock the
    callback needs (``Event.set()`` of the same event: a deadlock). They must not block
    long. ``leave`` must end the process like ``stop``.
    """

    def later(what: str, callback: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        def run(signum: int) -> None:
            log.info("signal %d: %s", signum, what)
            callback()

        def handler(signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=run, args=(signum,), name=f"signal-{signum}",
                             daemon=True).start()

        return handler

    def nothing() -> None:
        pass

    handlers = {
        signal.SIGTERM: later("stopping", stop), signal.SIGINT: later("stopping", stop),
        signal.SIGHUP: later("reloading", reload) if reload is not None
        else later("nothing to reload here: ignored", nothing),
        signal.SIGUSR2: later("exiting, leaving HAProxy running (and DNS/HTTP answering) for "
                              "the next watcher", leave) if leave is not None
        else later("not used by this command: ignored", nothing)}
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    for early in held.pending if held is not None else ():  # (the handlers are in place:
        handlers[signal.Signals(early)](early, None)  # nothing more is recorded)
