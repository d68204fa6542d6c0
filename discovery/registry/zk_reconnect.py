"""When a ZooKeeper client tries to reconnect: a fleet that lost a restarted ensemble comes
back evenly over the resume window (``spread=``), not in the ensemble's first second.

Each attempt tries every member (kazoo's connect loop). After a failed attempt the client
waits:

1. at most :data:`FIRST` (0.2 s) after a lost connection: another member takes over at once
   when only one was lost;
2. after any later failure, until its next turn: the turns of a host are one window apart on
   the clock, at a phase it drew at random once.

Whenever the ensemble serves again, each host's next attempt is therefore equally likely
anywhere in the window after it, and the fleet's attempts arrive at an even rate. A new
random wait within the window after *every* failure (the policy before) also averages one
attempt a half window, but the attempts right after the ensemble's return are the likelier
ones: a host waiting its turn is more often near the end of a short wait than of a long one,
so 56 % of a 3 s window's reconnects come in its first second (1 - (2/3)²). The turns are
kept on the clock, not counted from the end of the last attempt, so that attempts that end
together (at a member that takes connections before it answers them) do not keep their hosts
in step. This spreads the attempts, not the handshakes: in the fleet bench up to 77 % of a
500-host fleet's handshakes still completed within one second of the ensemble serving,
under three of the four policies tried (docs/benchmarks.md), and the restart peak there was
not measurably lower.

The window is at most a third of the session timeout, so a session gets about three attempts
after the ensemble serves again (members that are down or not serving yet refuse or close
at once, so a failed attempt rarely runs into the next turn). An attempt that connects resets the
count (kazoo's ``reset()``), so the next loss is again retried at once.

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

#: the longest wait after a lost connection
FIRST = 0.2
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

    def __init__(self, window: float, interrupt: Callable[[], bool] | None = None,
                 phase: float | None = None) -> None:
        super().__init__(max_tries=-1, interrupt=interrupt)  # no deadline: kazoo's is None
        self.window = window
        self.phase = spread(window) if phase is None else phase  # this host's turns

    def copy(self) -> ReconnectSchedule:
        obj = ReconnectSchedule(self.window, self.interrupt, self.phase)
        obj.sleep_func, obj.retry_exceptions = self.sleep_func, self.retry_exceptions
        return obj

    def wait(self, failed: int, now: float) -> float:
        """Seconds to wait at ``now`` (monotonic) after the ``failed``-th failed attempt in a row
        (1: the first after a lost connection)."""
        if failed <= 1:
            return spread(FIRST)
        return self.window - (now - self.phase) % self.window  # the next turn

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.reset()  # kazoo resets it too once an attempt connected
        while True:
            try:
                return func(*args, **kwargs)
            except ConnectionClosedError:  # a SessionExpiredError kazoo does not retry
                raise
            except self.retry_exceptions:
                self._attempts += 1
                now = time.monotonic()
                end = now + self.wait(self._attempts, now)
                while (left := end - time.monotonic()) > 0:
                    self.sleep_func(min(_TICK, left))
                    if self.interrupt is not None and self.interrupt():
                        raise RetryInterrupted() from None


def install_schedule(client: Any, url: RegistryURL, session_timeout: float) -> ReconnectSchedule:
    """Make ``client`` (a KazooClient, not started) reconnect on this schedule."""
    connection = client._connection
    if not isinstance(getattr(connection, "retry_sleeper", None), KazooRetry):
        raise TypeError("kazoo's connection has no retry_sleeper to replace: a kazoo release "
                        "this project does not know")
    schedule = ReconnectSchedule(window(url, session_timeout), client._stopped.is_set)
    schedule.sleep_func = client.handler.sleep_func
    connection.retry_sleeper = schedule  # what kazoo's connection loop copies
    return schedule
