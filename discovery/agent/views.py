"""What the agent shows of itself and the one switch it takes from outside: its checks'
live state, its status (``/v1/agent/checks``, ``/v1/health``) and maintenance
(``PUT /v1/agent/maint``, ``discovery maint``). A mixin of :class:`~discovery.agent.core.Agent`,
which holds the state it reads."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from discovery.agent.config import AgentConfig
from discovery.agent.docker_source import DockerSource
from discovery.agent.history import Cause, History
from discovery.agent.maint import Maintenance
from discovery.agent.registrations import Registrations
from discovery.agent.tracked import Key, Tracked, check_views
from discovery.errors import ConfigError, DiscoveryError
from discovery.registry import Snapshot

log = logging.getLogger(__name__)
#: containers a reconcile asks Docker about for :meth:`AgentViews.forget_removed`
FORGET_AT_ONCE = 20


class AgentViews:
    config: AgentConfig
    docker: DockerSource
    maint: Maintenance
    history: History
    registrations: Registrations
    registry_connected: bool
    _lock: threading.RLock
    _tracked: dict[str, Tracked]

    def _apply(self, tracked: Tracked, key: Key, cause: Cause) -> None:
        raise NotImplementedError  # the agent's: write or remove one instance as it stands

    def set_maint(self, instance_id: str | None, on: bool) -> tuple[list[str], list[str]]:
        """Maintenance for one instance (by id) or, with None, the whole node: written as
        ``draining`` (HAProxy drains it, DNS stops answering it) without stopping anything.
        The two are apart, as in Consul: the node's off leaves an instance's own on, and the
        other way round. Returns the ids whose state changed and those of the ids asked for
        that stay otherwise (held by the other); an unknown id raises :class:`ConfigError`."""
        with self._lock:
            known = {k[1]: (t, k) for t in self._tracked.values() for k in t.instances}
            if instance_id is not None and instance_id not in known:
                raise ConfigError(f"instance {instance_id[:80]!r} is not on this node")
            asked = sorted(known) if instance_id is None else [instance_id]
            before = {iid: self.maint.active(iid) for iid in asked}
            self.maint.set(instance_id, on)  # saved in the state dir: survives a restart
            changed = [iid for iid in asked if self.maint.active(iid) != before[iid]]
            held = [iid for iid in asked if self.maint.active(iid) != on]
            cause = Cause("maintenance_on" if on else "maintenance_off",
                          "whole node" if instance_id is None else "")
            for iid in changed:
                tracked, key = known[iid]
                self._apply(tracked, key, cause)
            log.info("maintenance %s for %s%s", "on" if on else "off",
                     instance_id or f"node {self.config.node}",
                     f"; still in maintenance: {', '.join(held)}" if held else "")
            return changed, held

    def checks(self) -> list[dict[str, Any]]:
        """Live health of every instance on this node: check type, state, last output, since."""
        with self._lock:
            return check_views(self._tracked.values(), set(self.registrations.written),
                               self.maint.active,
                               self.history.flapping())

    def status(self) -> dict[str, Any]:
        """Counts and flags, read without the agent's lock (each read is one atomic step):
        /v1/health, which reads this, must answer the image's HEALTHCHECK within 3 s whatever
        holds the lock (registry writes once did: three to a member that never answered, 14 s;
        they are made outside it since)."""
        return {
            "node": self.config.node,
            "docker_connected": self.docker.connected,
            "registry_connected": self.registry_connected,
            "containers": len(self._tracked),
            "registered": len(self.registrations.written),
            "maintenance": sorted(list(self.maint.ids)) + (["node"] if self.maint.node else []),
            "time": time.time(),
        }

    def _adopt_late(self, snap: Snapshot) -> None:
        """This node's entries in ``snap``, adopted if the read at start failed
        (:meth:`Registrations.adopt_late`): their containers' checks healthy, no warm-up."""
        def failing(key: Key) -> bool:  # its check's last result since the start a failure
            return any(t.failed(key) for t in self._tracked.values())

        if late := self.registrations.adopt_late(snap, failing):
            for tracked in self._tracked.values():
                tracked.adopt(late)

    def forget_removed(self) -> None:
        """The maintenance of containers Docker no longer has (removed while the agent was
        down: no ``destroy`` seen) dropped: asked outside the agent's lock, at most
        ``FORGET_AT_ONCE`` a time, dropped under it. A stopped container's is kept. What is in
        maintenance is read under the lock too: ``PUT /v1/agent/maint`` and a ``destroy``
        change it in place under it (read without, "Set changed size during iteration" ended
        the agent's run loop)."""
        with self._lock:
            held = self.maint.containers() - {cid[:12] for cid in self._tracked}
        for short in sorted(held)[:FORGET_AT_ONCE]:
            try:
                gone = self.docker.inspect(short) is None
            except DiscoveryError:
                return  # Docker does not answer: the next reconcile asks again
            if gone:
                with self._lock:
                    self.maint.forget(short)
