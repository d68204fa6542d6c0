"""A registry seen through a set of services: what a watcher that only routes uses.

A watcher that routes k services and serves neither DNS nor HTTP (nor writes the whole
catalog to ``--json-out``) needs those k services and nothing else. :class:`ServicesView`
wraps a :class:`~discovery.registry.base.Registry` so that its snapshot and watch cover only
them (etcd: one watcher per service prefix; ZooKeeper: only those directories), whatever the
size of the fleet. When the routed services change (SIGHUP), :meth:`ServicesView.set_services`
starts a watch of the new set, whose first read is handed to the watch's callback as a
``reset``; the old watch runs on until then (a registry away for a while: its changes still
come, and the read is tried again until it succeeds), and is stopped then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import replace
from functools import partial

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.registry.base import (
    Change,
    ChangeCallback,
    Registry,
    Snapshot,
    StateCallback,
    Watch,
    deliver,
)
from discovery.registry.succession import Succession
from discovery.retry import backoff

log = logging.getLogger(__name__)


class ServicesView:
    """``registry`` restricted to ``services`` for reads; writes pass through unchanged."""

    def __init__(self, registry: Registry, services: Collection[str]) -> None:
        self.inner = registry
        self.url = registry.url
        self.reads = registry.reads
        self.services = frozenset(services)
        self._lock = threading.Lock()
        self._follow_lock = threading.Lock()
        self._watches: list[_ViewWatch] = []

    @property
    def invalid_records(self) -> int:
        return self.inner.invalid_records

    def register(self, instance: Instance) -> None:
        self.inner.register(instance)

    def deregister(self, service: str, instance_id: str) -> None:
        self.inner.deregister(service, instance_id)

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot:
        return self.inner.snapshot(self.services if services is None
                                   else self.services & frozenset(services))

    def node_snapshot(self, node: str) -> Snapshot:
        return self.inner.node_snapshot(node)

    def watch(self, callback: ChangeCallback, start_revision: int = 0,
              services: Collection[str] | None = None) -> Watch:
        if services is not None:
            raise RegistryError("a ServicesView watches its own services (set_services)")
        with self._lock:
            w = _ViewWatch(self.inner, callback, self.services, start_revision)
            self._watches.append(w)
        return w

    def set_services(self, services: Collection[str]) -> None:
        """Follow ``services`` from now on: each watch gets a ``reset`` holding them. Returns
        at once (safe from a signal handler); the read happens on a thread of its own."""
        new = frozenset(services)
        with self._lock:
            if new == self.services:
                return
            log.info("following %d service(s) now (was %d)", len(new), len(self.services))
            self.services = new
        threading.Thread(target=self._follow, args=(new,), daemon=True,
                         name="registry-view").start()

    def _follow(self, services: frozenset[str]) -> None:
        with self._follow_lock:  # one at a time, and only the newest set
            with self._lock:
                watches = list(self._watches) if services == self.services else []
            for w in watches:
                w.follow(services, lambda: self.services)

    def add_state_listener(self, callback: StateCallback) -> None:
        self.inner.add_state_listener(callback)

    def close(self, revoke: bool = True) -> None:
        with self._lock:
            watches, self._watches = self._watches, []
        for w in watches:
            w.stop()
        self.inner.close(revoke)


class _ViewWatch:
    """The watch of a view; re-created on the inner registry when the services change
    (:class:`~discovery.registry.succession.Succession`: the old watch's changes are passed on
    until the new one's read, and dropped after it)."""

    def __init__(self, inner: Registry, callback: ChangeCallback, services: frozenset[str],
                 start_revision: int) -> None:
        self._inner, self._callback = inner, callback
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._delivering = threading.Lock()  # one change at a time, of the current watch
        self._watches = Succession()
        self._watch = inner.watch(partial(self._deliver, services, 0), start_revision, services)

    def _deliver(self, services: frozenset[str], number: int, change: Change) -> None:
        if change.kind == "reset":  # a read of ``services`` only: the others are not gone
            change = replace(change, snapshot=replace(change.snapshot or Snapshot(),
                                                      scope=services))
        with self._delivering:
            if self._watches.take(number, change):
                deliver(self._callback, change, self._stopped)

    def follow(self, services: frozenset[str], newest: Callable[[], frozenset[str]]) -> None:
        """Follow ``services``: their read tried until it succeeds (the old watch runs on
        meanwhile), or until stopped, or ``newest()`` (the view's set) is another set."""
        with self._lock:
            if self._stopped.is_set():
                return
            old = self._watch
            try:  # its first read is the reset (ZooKeeper: the read that arms its watches)
                for attempt in backoff(RegistryError, stop_event=self._stopped,
                                       what="reading the routed services", logger=log):
                    if newest() != services:  # a newer set: its own follow reads it
                        return
                    with attempt:
                        _, self._watch = self._watches.make(
                            self._inner, partial(self._deliver, services), services,
                            self._delivering)
            except RegistryError:  # stopped
                return
            old.stop()

    def stop(self) -> None:
        self._stopped.set()  # first: ends a backoff in follow() that holds the lock
        with self._lock:
            self._watch.stop()
