"""When a ZooKeeper client tries to reconnect: a fleet that lost a restarted ensemble comes
back evenly over the resume window (``spread=``), not in the ensemble's first second.

Each attempt tries every member (kazoo's connect loop); after a failed attempt the client
waits:

1. at most :data:`FIRST` (0.2 s): another member takes over at once when only one was lost;
2. a random moment within the window: each host of the fleet picks its own phase;
3. then exactly one window, so each host keeps that phase.

Whenever the ensemble serves again, each host's next attempt is therefore equally likely
anywhere in the window after it, and the fleet's reconnects arrive at an even rate over that
window. Retrying at a random moment within the window *every* time (the policy before) also
averages one attempt per half window, but the attempts that fall right after the ensemble is
back are the more likely ones (a host waiting its turn is more often near the end of a short
wait than of a long one): 56 % of a 3 s window's reconnects come in its first second
(1 - (2/3)²), and a 250-host fleet's restart peaked at 3.2 times its steady request rate in
the fleet bench. The window is at most a third of the session timeout, so a session has at
least three attempts before it expires.

kazoo's client accepts no subclass of its ``KazooRetry`` (it checks the exact type), so
:func:`install` puts this one in the place its connection loop copies its policy from.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import ConnectionClosedError
from kazoo.retry import InterruptedError as RetryInterrupted
from kazoo.retry import KazooRetry

from discovery.registry.base import RegistryURL

#: the longest wait after the first failed attempt (another member, at once)
FIRST = 0.2
#: how often a waiting client looks whether it was closed
_TICK = 0.1


def window(url: RegistryURL, session_timeout: float) -> float:
    """Seconds over which a fleet spreads its reconnects: the URL's ``spread=``, at most a third
    of the session timeout, at least 0.1."""
    return max(min(url.resume_spread, session_timeout / 3), 0.1)


class ReconnectSchedule(KazooRetry):
    """kazoo's connection retry with the waits of the module docstring; ``interrupt`` (kazoo's
    "the client was stopped") ends a wait within 0.1 s."""

    def __init__(self, window: float, interrupt: Callable[[], bool] | None = None) -> None:
        super().__init__(max_tries=-1, interrupt=interrupt)
        self.window = window

    def copy(self) -> ReconnectSchedule:
        return ReconnectSchedule(self.window, self.interrupt)

    def wait(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th failed attempt in a row."""
        if failed <= 1:
            return random.uniform(0, FIRST)
        if failed == 2:
            return random.uniform(0, self.window)
        return self.window

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.reset()  # kazoo resets it too once an attempt connected
        while True:
            try:
                return func(*args, **kwargs)
            except ConnectionClosedError:
                raise
            except self.retry_exceptions:
                self._attempts += 1
                end = time.monotonic() + self.wait(self._attempts)
                while (left := end - time.monotonic()) > 0:
                    self.sleep_func(min(_TICK, left))
                    if self.interrupt is not None and self.interrupt():
                        raise RetryInterrupted() from None


def install(client: Any, url: RegistryURL, session_timeout: float) -> ReconnectSchedule:
    """Make ``client`` (a KazooClient, not started) reconnect on this schedule."""
    schedule = ReconnectSchedule(window(url, session_timeout), client._stopped.is_set)
    client._connection.retry_sleeper = schedule  # what kazoo's connection loop copies
    return schedule
