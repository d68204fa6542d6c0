"""When a ZooKeeper client tries to reconnect: a fleet that lost a restarted ensemble comes
back evenly over the resume window (``spread=``), not in the ensemble's first second.

Each attempt tries every member (kazoo's connect loop). After a failed attempt the client
waits:

1. at most :data:`FIRST` (0.2 s) after a lost connection: another member takes over at once
   when only one was lost;
2. then a random moment within the window: each host of the fleet picks its own phase;
3. then exactly one window, so each host keeps that phase while the ensemble is down.

Whenever the ensemble serves again, each host's next attempt is therefore equally likely
anywhere in the window after it, and the fleet's reconnects arrive at an even rate. A new
random wait within the window after *every* failure (the policy before) also averages one
attempt a half window, but the attempts right after the ensemble's return are the likelier
ones: a host waiting its turn is more often near the end of a short wait than of a long one,
so 56 % of a 3 s window's reconnects came in its first second (1 - (2/3)²).

An attempt that failed *slowly* (:data:`SLOW` or more: a member took the connection and did not
answer in time, so the ensemble is there but busy) is followed by a quick one, as after a
lost connection, then a new phase: a session must not wait out whole windows while the
ensemble already serves. Members that are down or not serving yet refuse or close at once. (A
member whose address does not answer at all, a host powered off, also makes an attempt slow;
its attempts are then already a connect time-out apart.)
The window is at most a third of the session timeout.

kazoo's client takes no subclass of ``KazooRetry`` (it checks the exact type), so
:func:`install_schedule` puts the schedule where its connection loop copies its policy from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import ConnectionClosedError
from kazoo.retry import InterruptedError as RetryInterrupted
from kazoo.retry import KazooRetry

from discovery.registry.base import RegistryURL
from discovery.retry import spread

#: the longest wait after a lost connection or a slow failed attempt
FIRST = 0.2
#: seconds from which a failed attempt (every member tried) counts as slow: a member answered
#: the connection but not the handshake in time
SLOW = 1.0
#: how often a waiting client looks whether it was closed (as kazoo's own retry does)
_TICK = 0.1


def window(url: RegistryURL, session_timeout: float) -> float:
    """Seconds over which a fleet spreads its reconnects: the URL's ``spread=``, at most a third
    of the session timeout, at least 0.1."""
    return max(min(url.resume_spread, session_timeout / 3), 0.1)


class ReconnectSchedule(KazooRetry):
    """kazoo's connection retry with the waits of the module docstring; ``interrupt`` (kazoo's
    "the client was stopped") ends a wait within 0.1 s."""

    _attempts: int  # failed attempts in a row (kazoo's; set by its reset())

    def __init__(self, window: float, interrupt: Callable[[], bool] | None = None) -> None:
        super().__init__(max_tries=-1, interrupt=interrupt)
        self.window = window

    def copy(self) -> ReconnectSchedule:
        obj = ReconnectSchedule(self.window, self.interrupt)
        obj.sleep_func = self.sleep_func
        return obj

    def wait(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th quick failed attempt in a row (1: the first
        after a lost connection or a slow attempt)."""
        if failed <= 1:
            return spread(FIRST)
        if failed == 2:
            return spread(self.window)
        return self.window

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.reset()  # kazoo resets it too once an attempt connected
        while True:
            began = time.monotonic()
            try:
                return func(*args, **kwargs)
            except ConnectionClosedError:
                raise
            except self.retry_exceptions:
                # a slow attempt starts the count again: a quick retry, then a new phase
                slow = self._attempts > 0 and time.monotonic() - began >= SLOW
                self._attempts = 1 if slow else self._attempts + 1
                end = time.monotonic() + self.wait(self._attempts)
                while (left := end - time.monotonic()) > 0:
                    self.sleep_func(min(_TICK, left))
                    if self.interrupt is not None and self.interrupt():
                        raise RetryInterrupted() from None


def install_schedule(client: Any, url: RegistryURL, session_timeout: float) -> ReconnectSchedule:
    """Make ``client`` (a KazooClient, not started) reconnect on this schedule."""
    schedule = ReconnectSchedule(window(url, session_timeout), client._stopped.is_set)
    schedule.sleep_func = client.handler.sleep_func
    client._connection.retry_sleeper = schedule  # what kazoo's connection loop copies
    return schedule
