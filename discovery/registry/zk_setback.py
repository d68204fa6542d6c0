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
from collections.abc import Callable, Collection
from typing import Any

from kazoo.exceptions import (
    NoAuthError,
    NoNodeError,
    OperationTimeoutError,
    RequestTimeoutError,
    ThrottledOpError,
)

from discovery.model.validate import shown
from discovery.registry.base import Snapshot
from discovery.registry.url import RegistryURL
from discovery.registry.zk_scan import LivePaths
from discovery.retry import RetryAt, jittered

log = logging.getLogger(__name__)

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


class Withheld:
    """The services a full read could not list (NoAuth on their directory: an ACL changed by
    mistake), whose instances the catalog keeps (:attr:`Snapshot.withheld`), and the
    instance nodes kept though their own ACL refuses us (:attr:`Snapshot.unreadable`).
    ZooKeeper tells no watch about a node its client may not read (not even its delete), so
    each is looked at again (one request each: a listing, or a node's read) after a wait
    doubling from ``wait[0]`` to ``wait[1]`` (jittered: a fleet refused at one moment asks
    apart); once a directory may be listed, or is gone, everything is read again, and a node
    that may be read, or is gone, is read again alone: a kept instance does not stay stale
    once the ACL is fixed, nor for ever once it is deleted."""

    def __init__(self, wait: tuple[float, float]) -> None:
        self.services: frozenset[str] = frozenset()
        self.nodes: set[str] = set()
        self.retry = RetryAt(*wait)

    def scanned(self, snapshot: Snapshot, nodes: Collection[str] = ()) -> None:
        """A full read gave ``snapshot``, and kept ``nodes`` refused to it: look again later
        at what it withheld."""
        self.services, self.nodes = snapshot.withheld, set(nodes)
        if self.services or self.nodes:
            self.retry.failed(jitter=0.1)
        else:
            self.retry.succeeded()

    def kept(self, path: str, live: LivePaths) -> bool:
        """Whether ``path``, refused to a read after the full read, is kept as last read (as a
        record that does not decode is): one read before (in ``live``); then looked at again
        too."""
        if live.get(path) is None:
            return False
        if not self.services and not self.nodes:
            self.retry.failed(jitter=0.1)
        self.nodes.add(path)
        return True

    def ready(self, client: Any, url: RegistryURL) -> list[tuple[str, str]]:
        """Look at each: what to read now. A directory that may be listed (or is gone):
        everything (``reset``). Kept nodes that may be read (or are gone): each alone
        (``node``), and no longer looked at; before, one node's ACL set back, or its delete,
        cost every follower a full read of its catalog."""
        for service in sorted(self.services):
            if self._open(client.get_children, url.service_dir(service)):
                log.info("ZooKeeper lets us list %s again (or it is gone): reading everything",
                         shown(url.service_dir(service)))
                return [("reset", "")]
        freed = [p for p in sorted(self.nodes) if self._open(client.get, p)]
        self.nodes.difference_update(freed)
        if freed:  # (one line: a script may free thousands at once)
            log.info("ZooKeeper lets us read %d kept node(s) again (or they are gone): reading "
                     "them: %s", len(freed), ", ".join(map(shown, freed[:5]))
                     + (" ..." if freed[5:] else ""))
        if self.services or self.nodes:
            wait = self.retry.failed(jitter=0.1)
            log.debug("still refused: %s; looked at again in %.1f s",
                      sorted(self.services) + sorted(self.nodes), wait)
        else:
            self.retry.succeeded()
        return [("node", path) for path in freed]

    @staticmethod
    def _open(look: Callable[[str], object], path: str) -> bool:
        """Whether ``path`` may be looked at now (or is gone)."""
        try:
            look(path)
        except NoAuthError:
            return False
        except NoNodeError:
            pass
        return True
