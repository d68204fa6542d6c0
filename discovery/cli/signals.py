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


def on_signals(stop: Callable[[], None], reload: Callable[[], None] | None = None,
               leave: Callable[[], None] | None = None) -> None:
    """Call ``stop`` on SIGTERM or SIGINT, ``reload`` (if given) on SIGHUP, and ``leave`` (if
    given) on SIGUSR2.

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

    signal.signal(signal.SIGTERM, later("stopping", stop))
    signal.signal(signal.SIGINT, later("stopping", stop))
    if reload is not None:
        signal.signal(signal.SIGHUP, later("reloading", reload))
    if leave is not None:
        signal.signal(signal.SIGUSR2, later("exiting, leaving HAProxy running (and DNS/HTTP "
                                            "answering) for the next watcher", leave))
