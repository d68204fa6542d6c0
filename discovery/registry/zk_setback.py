"""How long a ZooKeeper follower's worker (:class:`~discovery.registry.zk_watch.ZkWatch`) waits
after an item failed on an answer of the ensemble's (a lost connection is not one: that item
waits for the connection), and what it does then. Each wait doubles while the failures go on
and is jittered (:class:`~discovery.retry.RetryAt`), so that a fleet that failed at one moment
tries again apart:

- the ensemble is busy: it sheds load (``THROTTLEDOP``, ZooKeeper 3.7+ with
  ``throttledOpWaitTime``) or a request timed out in it (``REQUESTTIMEOUT``,
  ``OPERATIONTIMEOUT``): that item is tried again, and nothing else read again, after 1 s
  doubling to 30 s (±50 %), from 1 s again once an item goes through;
- refused (NoAuth): everything is read again after the ``refused`` wait (5 s doubling to 60 s,
  ±10 %), from the first again once a full read succeeds;
- anything else: everything is read again after 1 s doubling to 60 s (±50 %), from 1 s again
  once a full read succeeds.

Before, anything but a lost connection or a refusal waited a fixed 1 s and read everything
again: every throttled host re-read its whole followed catalog each second, in step, while the
ensemble was overloaded.
"""

from __future__ import annotations

import logging

from kazoo.exceptions import (
    NoAuthError,
    OperationTimeoutError,
    RequestTimeoutError,
    ThrottledOpError,
)

from discovery.retry import RetryAt, jittered

#: the ensemble's answers that say it is busy: the same item again, later
BUSY = (ThrottledOpError, RequestTimeoutError, OperationTimeoutError)
#: s before a busy item is tried again: the first, doubling to the last while busy
BUSY_WAIT = (1.0, 30.0)
#: s before all is read again after any other failure: the first, doubling to the last
FAILED_WAIT = (1.0, 60.0)
JITTER = 0.5


class Setbacks:
    """The waits of one worker; ``refused``: the first and the longest wait after a NoAuth;
    each failure is logged on ``log`` (the watch's)."""

    def __init__(self, refused: tuple[float, float], log: logging.Logger) -> None:
        self._busy, self._failed = RetryAt(*BUSY_WAIT), RetryAt(*FAILED_WAIT)
        self._refused, self._log = RetryAt(*refused), log

    def handled(self) -> None:
        """An item went through: the next busy answer waits the first wait again."""
        self._busy.succeeded()

    def scanned(self) -> None:
        """A full read went through: the next refusal or failure waits the first wait again."""
        self._refused.succeeded()
        self._failed.succeeded()

    def after(self, exc: Exception, what: str) -> tuple[float, bool]:
        """The wait after ``exc`` failed an item (of ``what``: its path), logged, and whether
        everything is to be read again after it (False: that item)."""
        if isinstance(exc, BUSY):
            wait = self._busy.failed(JITTER)
            self._log.warning("ZooKeeper watch: %s reading %s (the ensemble is busy); trying "
                              "it again in %.1f s", type(exc).__name__, what, wait)
            return wait, False
        if isinstance(exc, NoAuthError):  # an ACL without world READ, and we lack credentials
            wait = jittered(self._refused.failed())  # a fleet refused at once reads apart
            self._log.warning("ZooKeeper watch may not read %s (NoAuth): give the registry "
                              "user and password; reading everything again in %.1f s", what,
                              wait)
            return wait, True
        wait = self._failed.failed(JITTER)
        self._log.error("ZooKeeper watch failed on %s; re-reading everything in %.1f s", what,
                        wait, exc_info=exc)
        return wait, True
