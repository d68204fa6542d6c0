"""Client-side discovery: read the registry from your own Python code, no HAProxy needed.

::

    from discovery import Client

    with Client("etcd://127.0.0.1:2379/discovery") as client:
        client.instances("web", tag="blue")        # [Instance, ...], healthy ones
        client.pick("web")                         # one, weighted at random
        handle = client.watch("web", print)        # called now, then on every change
        ...
        handle.stop()

Without a watch every call reads the registry once (one consistent snapshot of the service
asked for). :meth:`Client.watch` (or :meth:`Client.follow`) starts a live catalog: one
snapshot, then the registry's change stream, of the services watched (``follow()`` with no
argument: of all of them); from then on reading those is local and cheap, and a lost
connection keeps the last known catalog (the backend resumes or re-reads everything when it
is back). The live catalog has the watcher's wipe guard: a registry-side wipe (every lease
revoked, the prefix deleted) does not empty it in every process of the fleet at once.
See docs/client.md.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
from collections.abc import Callable
from types import TracebackType

from discovery.client_catalog import LiveCatalog
from discovery.errors import (
    ConfigError,
    DiscoveryError,
    RegistryError,
    RegistryUnavailable,
)
from discovery.model import Instance, State
from discovery.registry import Registry, RegistryURL, open_registry

log = logging.getLogger(__name__)

__all__ = [
    "Client",
    "ClientClosed",
    "ConfigError",
    "DiscoveryError",
    "Instance",
    "InstancesCallback",
    "NoInstances",
    "RegistryError",
    "RegistryUnavailable",
    "State",
    "Subscription",
]

#: A watch callback: called with the service's full current list of instances.
InstancesCallback = Callable[[list[Instance]], None]


class NoInstances(DiscoveryError, LookupError):
    """:meth:`Client.pick` found no instance to pick (none up, or all of weight 0)."""


class ClientClosed(RegistryError):
    """The :class:`Client` was closed."""


def select(instances: list[Instance], service: str, tag: str | None = None,
           include_draining: bool = False) -> list[Instance]:
    """The instances of ``service`` having ``tag`` (if given), up ones only unless
    ``include_draining``; sorted by id, as every method of :class:`Client` returns them."""
    found = [
        i for i in instances
        if i.service == service
        and (tag is None or tag in i.tags)
        and (include_draining or i.state is State.UP)
    ]
    return sorted(found, key=lambda i: i.id)


def _same(a: list[Instance], b: list[Instance]) -> bool:
    """Equal but for ``registered_at``: a re-written, unchanged record is no news."""
    return len(a) == len(b) and all(x.same_registration(y) for x, y in zip(a, b, strict=True))


class Subscription:
    """What :meth:`Client.watch` returns. ``stop()`` ends the watch: once it returns no
    callback of it runs or starts. It waits for one already running on the dispatcher thread
    (so do not call it holding a lock that callback needs, nor from another client's callback
    that this one's may be stopping); from inside the callback it returns at once."""

    def __init__(self, client: Client, service: str, callback: InstancesCallback,
                 tag: str | None, include_draining: bool) -> None:
        self.service, self.tag, self.include_draining = service, tag, include_draining
        self.callback = callback
        self._client = client
        self._stopped = threading.Event()
        self._calling = threading.RLock()  # held by the dispatcher while the callback runs
        self._last: list[Instance] = []  # the last list the callback was given
        self._queued = False  # on the dispatcher's queue (at most once: changes coalesce)
        self._first = True  # the first call comes whatever the list

    @property
    def active(self) -> bool:
        return not self._stopped.is_set()

    @property
    def instances(self) -> list[Instance]:
        """The current list (what the callback gets next, or got last)."""
        return self._client._current(self)

    def stop(self) -> None:
        self._stopped.set()  # first: a list queued meanwhile is skipped, not called
        with self._calling:  # then a call already running ends
            pass
        self._client._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        tag = f" tag={self.tag}" if self.tag else ""
        state = "active" if self.active else "stopped"
        return f"<Subscription {self.service}{tag} {state} {len(self._last)} instance(s)>"


class Client:
    """Reads services from an ``etcd://`` or ``zk://`` registry (the agent's URL and prefix).

    ``timeout``: seconds each registry request may take before :class:`RegistryUnavailable`
    (a call of several, a count then a read or pages, may take more in all).
    ``wipe_guard``: the live catalog holds what a registry-side wipe removes (docs/client.md).
    Thread-safe. Use it as a context manager, or call :meth:`close`.
    Raises :class:`ConfigError` at once for a malformed URL, or a ``timeout`` that is not a
    finite number of seconds above 0.
    """

    def __init__(self, registry_url: str | RegistryURL, *, timeout: float = 5.0,
                 wipe_guard: bool = True) -> None:
        if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(f"timeout must be a finite number of seconds above 0, "
                              f"not {timeout!r}")
        self.url = (registry_url if isinstance(registry_url, RegistryURL)
                    else RegistryURL.parse(registry_url))
        self.timeout = timeout
        self._registry: Registry = open_registry(self.url, timeout=timeout)
        self._lock = threading.RLock()  # also the live catalog's
        self._live = LiveCatalog(self._registry, self._lock, self._touched, wipe_guard)
        self._subs: list[Subscription] = []
        # the subscriptions whose list may have changed, each at most once
        self._queue: queue.SimpleQueue[Subscription | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        self._rng = random.Random()

    # -- reads ------------------------------------------------------------------------------

    def instances(self, service: str, tag: str | None = None, *,
                  include_draining: bool = False) -> list[Instance]:
        """Instances of ``service`` (sorted by id), only those tagged ``tag`` if given.

        Draining instances (being stopped, no new work) are left out unless
        ``include_draining``. Reads the live catalog when it follows ``service``, else the
        registry (that service only). Raises :class:`RegistryUnavailable` when the registry
        does not answer in time.
        """
        with self._lock:
            self._check_open()
            catalog = self._live.catalog if self._live.follows(service) else None
        found = (catalog.instances(service) if catalog is not None
                 else list(self._registry.snapshot({service}).instances.values()))
        return select(found, service, tag, include_draining)

    def services(self) -> list[str]:
        """Names of every service with at least one instance (up or draining), sorted. Reads
        the registry (all of it) unless :meth:`follow` was called with no argument."""
        with self._lock:
            self._check_open()
            catalog = self._live.catalog if self._live.follows(None) else None
        if catalog is not None:
            return sorted(catalog.services())
        return sorted({i.service for i in self._registry.snapshot().instances.values()})

    def pick(self, service: str, tag: str | None = None) -> Instance:
        """One up instance of ``service`` (having ``tag``), chosen at random in proportion to
        its weight; weight 0 is never picked. Raises :class:`NoInstances` when there is none.

        Without a watch of ``service`` this reads the registry on every call: for a request
        path, call :meth:`follow` (or :meth:`watch`) first.
        """
        candidates = [i for i in self.instances(service, tag) if i.weight > 0]
        if not candidates:
            what = f"{service!r}" + (f" with tag {tag!r}" if tag else "")
            raise NoInstances(f"no healthy instance of {what} in {self.url}")
        return self._rng.choices(candidates, weights=[i.weight for i in candidates])[0]

    # -- watching ---------------------------------------------------------------------------

    def follow(self, *services: str) -> None:
        """Keep a live catalog of ``services`` (added to those followed), or of every service
        (no argument): one read now, then changes. A process that needs a few services follows
        those, whatever the size of the fleet. Adding services reads those followed again, in
        one read: name them together (``follow("web", "db")``) rather than one at a time.

        Raises :class:`RegistryUnavailable` if that read fails; later outages are ridden out
        (the last known catalog keeps answering).
        """
        with self._lock:
            self._check_open()
        self._live.follow(frozenset(services) or None)
        with self._lock:
            self._check_open()
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._dispatch, daemon=True,
                                                    name="discovery-client-callbacks")
                self._dispatcher.start()

    def watch(self, service: str, callback: InstancesCallback, tag: str | None = None, *,
              include_draining: bool = False) -> Subscription:
        """Call ``callback(instances)`` with the full current list of ``service`` (as
        :meth:`instances` would return it) right away, then whenever that list changes
        (a record re-written with nothing but a new ``registered_at`` is no change).

        Calls come in order, one at a time, from one dispatcher thread shared by all watches
        of this client, so a slow callback delays the others (but never the registry); changes
        that come meanwhile make one call, with the newest list. An exception in a callback is
        logged and the watch goes on. Survives registry outages; after a resync (``reset``)
        the callback gets the new list if it differs. Follows ``service`` (:meth:`follow`).
        Raises :class:`RegistryUnavailable` when the registry cannot be read at the start.
        """
        self.follow(service)
        sub = Subscription(self, service, callback, tag, include_draining)
        with self._lock:
            self._check_open()
            sub._last = self._current(sub)  # the first call's list: the one at this moment
            self._subs.append(sub)
            self._changed(sub)
        return sub

    def _current(self, sub: Subscription) -> list[Instance]:
        with self._lock:
            catalog = self._live.catalog
        if catalog is None:
            return list(sub._last)
        return select(catalog.instances(sub.service), sub.service, sub.tag, sub.include_draining)

    def _changed(self, sub: Subscription) -> None:
        """(Under the lock.) ``sub``'s list may have changed: queued once until delivered."""
        if not sub._queued:
            sub._queued = True
            self._queue.put(sub)

    def _touched(self, services: set[str] | None) -> None:
        """(Under the lock: the live catalog's.) These services changed (None: any)."""
        for sub in self._subs:
            if services is None or sub.service in services:
                self._changed(sub)

    def _dispatch(self) -> None:
        while (sub := self._queue.get()) is not None:
            with sub._calling:
                with self._lock:
                    sub._queued = False
                first, sub._first = sub._first, False
                now = sub._last if first else self._current(sub)
                if not sub.active or (not first and _same(now, sub._last)):
                    continue
                sub._last = now
                try:
                    sub.callback(list(now))
                except BaseException:  # (asyncio's CancelledError, SystemExit too: they ended
                    log.exception("watch callback for %s failed", sub.service)  # every watch)
                if first:  # changes before the first call found it queued: look at them now
                    with self._lock:
                        self._changed(sub)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    # -- lifecycle --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"discovery client for {self.url} is closed")

    def close(self) -> None:
        """Stop every watch and disconnect. Idempotent; the client is unusable afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs, self._subs = list(self._subs), []
            dispatcher = self._dispatcher
        for sub in subs:
            sub._stopped.set()
        self._live.close()  # outside the lock: stopping joins the backend's thread
        self._queue.put(None)
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(self.timeout)
        self._registry.close(revoke=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ("closed" if self._closed else "live" if self._live.catalog is not None
                else "snapshot")
        return f"<discovery.Client {self.url} {mode}>"
