"""One way for a daemon command to take SIGTERM/SIGINT (stop) and SIGHUP (reload)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def on_signals(stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
    """Call ``stop`` on SIGTERM or SIGINT and ``reload`` (if given) on SIGHUP.

    Handlers run on the main thread between bytecodes; both callbacks must only set events or
    hand work to another thread, never block.
    """

    def on_term(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: reload())
