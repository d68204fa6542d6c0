"""What an etcd watch (:mod:`~discovery.registry.etcd_watch`) does when its stream fails: a lost
link, or a refusal.

A **lost link** (``RegistryUnavailable``, a gRPC ``UNAVAILABLE``, no member to be reached) is
what a whole fleet sees at once when its registry restarts. The broken stream is re-opened soon
(another member: after 0.1 s plus up to a third of the resume spread at random, so that the
hosts of a member that died do not all come to the others within the same 100 ms), then
after half the registry URL's resume spread plus up to one spread at random, every time
(:func:`discovery.retry.backoff_async` with a fixed wait): the fleet's streams come back over
that window, each host within one spread of the registry's return
(docs/benchmarks.md). The registry is reported down; the first failure is logged. A watch
given a window of its own (``later``: the host's own keys, :mod:`~discovery.registry.etcd_own`)
waits instead a random moment within it after each lost link, once it has a revision to
resume from (etcd replays what it missed).

A **refusal** is etcd answering no: it denies a watcher (``permission denied``: the role may
not read the range; ``user name is empty``: etcd wants a user), it refuses the login (the
password given is no longer etcd's), or any other ``RegistryError`` but ``RegistryUnavailable``
(a re-read after compaction that is denied). Trying again at the resume rate changes nothing
and costs etcd every time (a failed login is a bcrypt: measured 61 ms of etcd CPU). So the wait
doubles from the same first wait (half a spread) up to ``REFUSED_MAX``, plus up to one spread
at random (:class:`discovery.retry.RetryAt`, :func:`discovery.retry.spread`), and starts again
once a stream holds its watchers. Each refusal is logged (WARNING) with etcd's reason and the
wait. The registry is not reported down for it: etcd answered (a lost link, or a liveness read
that no member answers, still reports it down).

**One service denied** among the k > 1 a filtered watch follows (a role granting read on some
of them: a service added to the routed ones before the role) is no refusal of the others: its
watcher is left out, the stream holds the others' watchers, and it is asked again on the same
stream (one ``WatchCreate``) after a wait that doubles to ``REFUSED_MAX``
(:class:`DeniedRanges`). Once etcd allows it, the watch reads everything it follows once (a
``reset``: that service was never read, or changed while denied). Before, the whole stream was
refused and retried, and no followed service's change came through meanwhile.

A **message over the receive limit** (gRPC's ``RESOURCE_EXHAUSTED``: "Received message larger
than max") is no lost link either: etcd answers a watcher that resumes behind the present with
up to 1,000 revisions in one message, ~79 MB for 50 values of 1.5 MiB (the limit is 64 MiB,
:data:`~discovery.registry.etcd_read.MAX_RECEIVE_BYTES`), and would answer the same to the same
resume every time: the registry flapped down and up, and etcd sent it again each try. The watch
reads everything it follows instead (paged: each value fits), as after a compaction, and
watches on from that read's revision (logged each time; the registry is not reported down).

A **wide resume** (k > 1 services: one watcher on the whole prefix) that etcd denies is no
refusal of what the watch follows (a role granting read on the followed services only, not on
the prefix docs/security.md asks for): the watch resumes at once with its k watchers, and no
longer resumes wide (logged once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from typing import NoReturn

import grpc
import tenacity

from discovery.errors import LoginRefused, RegistryError, RegistryUnavailable
from discovery.model.validate import shown
from discovery.registry.security import hint, rpc_details
from discovery.retry import RetryAt, backoff_async, spread

#: re-opening a broken stream: once after 0.1 s (another member) plus up to FIRST_SPREAD of the
#: resume spread at random (1 s of the default 3 s), then every half resume spread plus up to
#: one spread at random (a fleet whose registry is down retries one spread apart on average, so
#: it comes back over that window when the registry does)
RECONNECT_INITIAL = 0.1
FIRST_SPREAD = 1 / 3
#: seconds a stream must have held its watchers for its loss to be a first one (soon)
HELD_BRIEFLY = 1.0
#: the longest wait after a refusal (plus up to one resume spread at random)
REFUSED_MAX = 60.0


class StreamEnded(RegistryUnavailable):
    """A watch stream ended with neither an error nor our own cancel (a proxy or balancer in
    front of etcd may end one so): a lost link, waited for as any other."""


def ended(endpoint: object) -> NoReturn:
    """A watch stream on ``endpoint`` ended by the server without an error, told by a read's
    end or a write to the ended call: :class:`StreamEnded`."""
    raise StreamEnded(f"the watch stream on {endpoint} was ended without an error")


class WatchRefused(RegistryError):
    """etcd denied a watcher (its cancel reason says why)."""


def denied(reason: str) -> bool:
    """Whether a watch's cancel reason is etcd denying it (not a lost link, not a token to
    renew: :meth:`~discovery.registry.security.EtcdAuth.stale` tells those)."""
    low = reason.lower()
    return "permission denied" in low or "user name is empty" in low


def canceled(reason: str, rng: str) -> RegistryError:
    """The error of a watcher on ``rng`` that etcd canceled for ``reason``."""
    if denied(reason):
        return WatchRefused(f"etcd denied the watch on {rng}: {reason}{hint(reason)}")
    return RegistryUnavailable(f"watch canceled: {reason}")


def resuming(revision: int) -> str:
    """Where a watch whose last delivered revision is ``revision`` resumes (0: none delivered
    yet, so its watchers start from the present)."""
    return f"from revision {revision + 1}" if revision else "from the present"


def refused(exc: BaseException) -> bool:
    """Whether a failure is etcd refusing (see the module docstring), not a lost link."""
    if isinstance(exc, RegistryError):
        return not isinstance(exc, RegistryUnavailable)
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    return code == grpc.StatusCode.PERMISSION_DENIED


def over_limit(exc: BaseException) -> bool:
    """Whether a stream failed on an answer over the channel's receive limit (the docstring)."""
    if not (isinstance(exc, grpc.RpcError) and hasattr(exc, "code")):
        return False
    return (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "larger than max" in str(exc.details()))


class WatchFailures:
    """One watch's failures: which kind, how long it waits, what it logs (on ``log``, the
    watch's logger). ``where``: the registry's members, for the log."""

    def __init__(self, where: str, resume_spread: float, log: logging.Logger,
                 later: tuple[float, float] | None = None) -> None:
        self._where, self._spread, self._log = where, resume_spread, log
        self._first = max(resume_spread / 2, RECONNECT_INITIAL)
        self._later = None if later is None else (  # (never sooner than the backoff's wait)
            max(later[0], self._first), max(later[1], self._first))
        self._refused = RetryAt(self._first, REFUSED_MAX)
        self._held_at = -math.inf  # when a stream last held its watchers (monotonic)
        #: a lost link logged, and no stream has held its watchers since
        self.failing = False

    def link_backoff(self, stop_event: threading.Event) -> tenacity.AsyncRetrying:
        """The waits after a lost link: half a spread plus up to a spread, every time."""
        return backoff_async(Exception, stop_event=stop_event, initial=self._first,
                             maximum=self._first, jitter=self._spread)

    def interrupted(self, exc: BaseException, revision: int) -> bool:
        """A lost link (``revision``: the last delivered): True, and logged, when it is the
        first since a stream last held."""
        if self.failing:
            return False
        later = ("" if self._later is None or not revision
                 else " within {:g}-{:g} s".format(*self._later))
        self._log.warning("etcd watch on %s interrupted (%s); resuming %s%s",
                          self._where, rpc_details(exc), resuming(revision), later)
        self.failing = True
        return True

    async def lost(self, exc: BaseException, revision: int) -> bool:
        """A lost link: True once a wait of its own is over (the first since a stream held:
        another member, within a third of a spread; a watch that comes back ``later`` and has
        a ``revision`` to resume from: a random moment within that window, every time); False:
        the backoff waits (:meth:`link_backoff`), as after a stream lost within HELD_BRIEFLY of
        holding (a member or proxy that ends every stream at once is not asked again at once)."""
        first = (self.interrupted(exc, revision)
                 and time.monotonic() - self._held_at >= HELD_BRIEFLY)
        if self._later is not None and revision:
            await asyncio.sleep(random.uniform(*self._later))
            return True
        if first:
            await asyncio.sleep(RECONNECT_INITIAL + spread(self._spread * FIRST_SPREAD))
        return first

    async def refused(self, exc: BaseException, revision: int) -> None:
        """A refusal: logged with its reason, then the wait (:meth:`refusal_wait`)."""
        await asyncio.sleep(self.refusal_wait(exc, revision))

    def refusal_wait(self, exc: BaseException, revision: int) -> float:
        """The wait after a refusal (logged), which doubles each time. A login refused waits
        for the login's own next try (``EtcdAuth``: it doubles too), no longer: a try sooner is
        refused unsent, and a wait doubled again on top of it came up to a minute late."""
        wait = (max(exc.retry_in, RECONNECT_INITIAL) if isinstance(exc, LoginRefused)
                else self._refused.failed()) + spread(self._spread)
        why = str(exc) if isinstance(exc, RegistryError) else rpc_details(exc)
        self._log.warning("etcd watch on %s refused (%s); trying again in %.1f s, %s (the "
                          "registry is not reported down for it)",
                          self._where, why, wait, resuming(revision))
        return wait

    def too_large(self, exc: BaseException, revision: int) -> None:
        """etcd's answer to the watch (``revision``: the last delivered) is over the receive
        limit (:func:`over_limit`): logged; the caller reads everything again."""
        self._log.warning("etcd watch on %s: etcd's answer to the watch resuming %s is over "
                          "the receive limit (%s); reading everything followed again instead, "
                          "and watching on from that read", self._where, resuming(revision),
                          rpc_details(exc))

    def narrowed(self, reason: str, root: str, services: int) -> None:
        """etcd denied a wide resume on ``root``: the watch resumes with its own watchers."""
        self._log.warning("etcd watch on %s: a resume watching all of %s was denied (%s); "
                          "resuming with one watcher for each of the %d services, now and at "
                          "every resume (grant the registry user read on the whole prefix for "
                          "the one-watcher resume: docs/security.md)",
                          self._where, root, reason, services)

    def held(self) -> None:
        """A stream holds its watchers: the next failure is a first one again."""
        self.failing = False
        self._held_at = time.monotonic()
        self._refused.succeeded()


class DeniedRanges:
    """The ranges (``<prefix>/services/<service>/``) of a filtered watch that etcd denied while
    it allowed others: left out of the stream and asked again after a wait that doubles from
    half a resume spread to ``REFUSED_MAX`` (plus up to one spread), logged each time."""

    def __init__(self, where: str, resume_spread: float, log: logging.Logger) -> None:
        self._where, self._spread, self._log = where, resume_spread, log
        self._at = RetryAt(max(resume_spread / 2, RECONNECT_INITIAL), REFUSED_MAX)
        self.ranges: set[str] = set()
        self._reason = ""

    def skip(self, rng: str, reason: str) -> None:
        """etcd denied the watcher on ``rng`` (``reason``): it is left out for now."""
        self.ranges.add(rng)
        self._reason = reason

    def allowed(self, rng: str) -> bool:
        """etcd created a watcher on ``rng``: whether it had been denied (its service was not
        followed meanwhile: the caller reads everything again)."""
        if rng not in self.ranges:
            return False
        self.ranges.discard(rng)
        self._log.warning("etcd watch on %s: %s is allowed again; reading everything followed "
                          "once", self._where, shown(rng))
        if not self.ranges:
            self._at.succeeded()
        return True

    def first(self, ranges: list[str]) -> list[str]:
        """``ranges``, those not denied first (a denial then comes after a watcher etcd
        created on the stream: no forgotten token)."""
        return sorted(ranges, key=lambda r: r in self.ranges)

    def wait(self, following: int) -> float:
        """The stream holds ``following`` watchers without the denied: how long until they are
        asked again (logged)."""
        wait = self._at.failed() + spread(self._spread)
        self._log.warning("etcd watch on %s: etcd denied watching %s (%s); following the other "
                          "%d without it, asking again in %.1f s (grant the registry user's "
                          "role read on it: docs/security.md)", self._where,
                          ", ".join(shown(r) for r in sorted(self.ranges)), self._reason,
                          following, wait)
        return wait
