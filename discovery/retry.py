"""The one retry policy: every reconnect, restart and poll loop goes through these.

A small typed API over tenacity (in the spirit of stamina):

- :func:`backoff` retries an operation on the given exceptions with exponential backoff and
  jitter, so that a fleet that lost its registry at the same moment does not come back at the
  same moment. It sleeps on a stop event, so stopping never waits out a backoff::

      for attempt in backoff(RegistryError, stop_event=self._stop, what="registry"):
          with attempt:
              snapshot = registry.snapshot()

  When it gives up (``timeout`` passed, or ``stop_event`` set) the last exception is raised.
  :func:`backoff_async` is the same policy for a coroutine (the etcd watch streams, which run
  on an asyncio loop).
- :func:`poll` calls a check until it returns something truthy, or ``timeout`` passes.
- :class:`RetryAt` is the same doubling for a loop that cannot block on one operation (the
  watcher's): it only says when a failed operation is due again, the loop calls it then.
- :func:`jittered` spreads a period (an agent's resync, a lease renewal) by ±10 %, so a fleet
  that started at one moment (after a registry restart) does not stay in step.
- :func:`spread` is the random delay of one host's *resume* after it lost its registry (its
  watches' reconnect; its agent's reconcile, over a resync period): uniform over a window,
  ``RESUME_SPREAD`` seconds unless the registry URL says otherwise (``spread=``), so that a
  whole fleet that lost a restarted registry together comes back over that window, not in its
  first second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

log = logging.getLogger(__name__)
T = TypeVar("T")
Exceptions = type[BaseException] | tuple[type[BaseException], ...]
#: seconds over which a fleet spreads its resume after losing its registry (see :func:`spread`)
RESUME_SPREAD = 3.0


def _sleeper(stop_event: threading.Event | None, last: list[BaseException]
             ) -> Callable[[float], None]:
    """Sleep that a stop event cuts short: then it gives up at once with the last error
    (tenacity, left to itself, would make one more attempt before it looks at the event)."""
    if stop_event is None:
        return tenacity.nap.sleep

    def sleep(seconds: float) -> None:
        if stop_event.wait(seconds) and last:
            raise last[-1]

    return sleep


def _backoff_policy(on: Exceptions, stop_event: threading.Event | None, timeout: float | None,
                    initial: float, maximum: float, jitter: float, what: str,
                    logger: logging.Logger | None, last: list[BaseException] | None = None
                    ) -> dict[str, Any]:
    """What :func:`backoff` and :func:`backoff_async` retry on, wait and log; each error
    before a wait goes into ``last``."""
    stops: list[tenacity.stop.stop_base] = []
    if stop_event is not None:
        stops.append(tenacity.stop_when_event_set(stop_event))
    if timeout is not None:
        stops.append(tenacity.stop_after_delay(timeout))
    wait: tenacity.wait.wait_base = tenacity.wait_exponential(multiplier=initial, max=maximum)
    if jitter > 0:  # and up to half the wait more: at the cap a fleet's retries stay spread
        wait = wait + tenacity.wait_random_exponential(multiplier=initial / 2, max=maximum / 2) \
            + tenacity.wait_random(0, jitter)
    out = logger or log

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if last is not None and exc is not None:
            last[:] = [exc]
        if not what:
            return
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        out.warning("%s: %s; retrying in %.1fs (attempt %d)", what, exc, delay,
                    state.attempt_number)

    return {"retry": tenacity.retry_if_exception_type(on),
            "stop": tenacity.stop_any(*stops) if stops else tenacity.stop_never,
            "wait": wait, "before_sleep": before_sleep, "reraise": True}


def backoff(on: Exceptions, *, stop_event: threading.Event | None = None,
            timeout: float | None = None, initial: float = 0.2, maximum: float = 5.0,
            jitter: float = 0.2, what: str = "", logger: logging.Logger | None = None
            ) -> tenacity.Retrying:
    """Retry on ``on`` with waits ``initial``·2ⁿ (at most ``maximum``), unless ``jitter`` is 0
    plus up to half that and ``jitter`` seconds at random (a fleet that failed together must not
    retry together: a fixed 0.2 s at a 5 s cap kept 90 % of 1,000 hosts within one second),
    until success, ``timeout`` seconds, or ``stop_event``.

    With ``what``, each retry is logged as a warning on ``logger`` (this module's by default):
    ``"<what>: <error>; retrying in 0.4s (attempt 2)"``.
    """
    last: list[BaseException] = []
    return tenacity.Retrying(sleep=_sleeper(stop_event, last), **_backoff_policy(
        on, stop_event, timeout, initial, maximum, jitter, what, logger, last))


def backoff_async(on: Exceptions, *, stop_event: threading.Event | None = None,
                  timeout: float | None = None, initial: float = 0.2, maximum: float = 5.0,
                  jitter: float = 0.2, what: str = "", logger: logging.Logger | None = None
                  ) -> tenacity.AsyncRetrying:
    """:func:`backoff` for a coroutine (``async for attempt in backoff_async(...)``): it
    sleeps with ``asyncio.sleep``; cancel the task to stop it sooner than ``stop_event``."""
    return tenacity.AsyncRetrying(sleep=asyncio.sleep, **_backoff_policy(
        on, stop_event, timeout, initial, maximum, jitter, what, logger))


def poll(check: Callable[[], T], *, timeout: float, interval: float = 0.02,
         stop_event: threading.Event | None = None) -> T:
    """Call ``check`` every ``interval`` seconds until it returns a truthy value (returned),
    or ``timeout`` seconds pass (or ``stop_event`` is set): then its last, falsy, value."""
    stops: list[tenacity.stop.stop_base] = [tenacity.stop_after_delay(timeout)]
    if stop_event is not None:
        stops.append(tenacity.stop_when_event_set(stop_event))
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda value: not value),
        stop=tenacity.stop_any(*stops),
        wait=tenacity.wait_fixed(interval),
        sleep=_sleeper(stop_event, []),  # one more check, then its value
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    return retrying(check)


def jittered(seconds: float, fraction: float = 0.1) -> float:
    """``seconds`` ± ``fraction`` of it, at random (uniform): the wait before periodic work."""
    return seconds * random.uniform(1.0 - fraction, 1.0 + fraction)


def spread(window: float) -> float:
    """A random delay in ``[0, window)`` (uniform; 0 when ``window`` <= 0)."""
    return random.uniform(0.0, window) if window > 0 else 0.0


class Outage:
    """How long a registry has been down, as its state listener tells: one per client (the
    agent's, each simulated host's in ``bench/fleet.py``)."""

    def __init__(self) -> None:
        self.since: float | None = None  # when it went down (monotonic), None while up

    def mark(self, up: bool) -> bool:
        """Record a state change; True when it ends an outage."""
        if up:
            ended, self.since = self.since is not None, None
            return ended
        if self.since is None:
            self.since = time.monotonic()
        return False

    def holds_back(self, period: float) -> bool:
        """Whether a resync of ``period`` falling due now should read nothing: down for less
        than two periods (its read would wait and go out in the registry's first second back,
        with every host's that fell due in the outage). Down for longer it reads anyway: an
        etcd client without a watch hears the registry is back only from a call that
        succeeds."""
        return self.since is not None and time.monotonic() - self.since < 2 * period


class RetryAt:
    """When a failed operation is due again, for a loop that polls (``due``, monotonic; 0:
    nothing to retry or due now, inf: held until told): the wait doubles from ``initial`` to
    ``maximum`` while it keeps failing, and starts again from ``initial`` once it succeeds."""

    def __init__(self, initial: float = 1.0, maximum: float = 30.0) -> None:
        self.initial, self.maximum = initial, maximum
        self.due = 0.0
        self.wait = 0.0

    def failed(self, jitter: float = 0.0) -> float:
        """It failed (again): due after the next wait (± ``jitter`` of it, at most
        ``maximum``: a fleet that failed at one moment tries apart), which is returned."""
        self.wait = min(max(2 * self.wait, self.initial), self.maximum)
        delay = min(jittered(self.wait, jitter), self.maximum) if jitter else self.wait
        self.due = time.monotonic() + delay
        return delay

    def now(self) -> None:
        """Due at once (the cause went away, e.g. the registry is back); the wait is kept."""
        self.due = 0.0

    def hold(self) -> None:
        """Not due until :meth:`now`, :meth:`failed` or :meth:`succeeded`."""
        self.due = math.inf

    def taken(self) -> bool:
        """Whether it is due now; if so it is no longer (the caller tries it: ``failed`` or
        ``succeeded`` follows), its wait kept for the next doubling."""
        if not self.due or time.monotonic() < self.due:
            return False
        self.due = 0.0
        return True

    def succeeded(self) -> None:
        self.due = self.wait = 0.0

    def remaining(self) -> float | None:
        """Seconds until it is due (0: now), None while nothing is due or it is held."""
        if not self.due or self.due == math.inf:
            return None
        return max(0.0, self.due - time.monotonic())
