"""The agent: Docker's truth → health checks → only healthy instances in the registry.

Writes (:mod:`~discovery.agent.registrations`) happen only on transitions, decided under the
agent's lock, made outside it by a thread of their own. Every ``resync`` seconds (±10 %, after
every Docker reconnect, soon after a failed write) it reconciles Docker's truth with this
node's entries, read alone, both ways; after the registry comes back or a SIGHUP at a random
moment within one resync period (at once if a write failed meanwhile)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from discovery.agent.checks import build_check
from discovery.agent.config import AgentConfig, restart_only
from discovery.agent.docker_source import DockerSource, event_fields
from discovery.agent.health import CheckRunner, CheckScheduler
from discovery.agent.history import Cause, History, docker_detail
from discovery.agent.labels import parse_container
from discovery.agent.maint import Maintenance
from discovery.agent.registrations import Registrations
from discovery.agent.spec import CheckResult, ServiceSpec
from discovery.agent.tracked import (
    KILL_GRACE,
    REFRESHING,
    Key,
    Tracked,
    instance_of,
    iso_ns,
    kill_grace,
    same_instances,
    stop_signal_of,
    wait_grace,
)
from discovery.agent.views import AgentViews
from discovery.agent.warmup import WarmupResult, WarmUps
from discovery.errors import CheckError, DiscoveryError, RegistryError, ValidationError
from discovery.metrics import Metrics
from discovery.model import Instance, State, make_instance_id
from discovery.registry import Registry
from discovery.retry import Outage, jittered, spread

log = logging.getLogger(__name__)

class Agent(AgentViews):
    def __init__(self, config: AgentConfig, registry: Registry,
                 metrics: Metrics | None = None) -> None:
        self.config, self.metrics, self.registry = config, metrics or Metrics(), registry
        self.metrics.follow_registry(registry)
        self._lock = threading.RLock()
        self._tracked: dict[str, Tracked] = {}
        self._bad_labels: dict[str, str] = {}  # container id → last label error logged
        self._stop, self._wake = threading.Event(), threading.Event()
        self._revoke = True
        self._pending_config: AgentConfig | None = None
        self._relisting: set[str] | None = None  # a reload lists Docker: containers with events
        self._killed: dict[str, tuple[float, Cause]] = {}  # id → grace's end, the kill's cause
        self._synced = False  # Docker listed at least once on the current connection
        self.registry_connected, self._reconnected = False, False  # back: the run loop tells
        self._outage = Outage()  # as its listener tells
        self.maint = Maintenance(config.state_dir, config.node)  # discovery maint, persisted
        self.history = History()  # each instance's transitions and their causes
        self.registrations = Registrations(registry, config.node, self.metrics, self.history,
                                           self._wake.set)
        self._checks = CheckScheduler()  # all its checks: 1 timer, 8 workers, 2 a container
        self._warmups = WarmUps(self._stop)  # at most 8 at once
        self.docker = DockerSource(config.docker, self._on_event, self._on_sync, self._on_docker)
        self.registry.add_state_listener(self._on_registry)

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Run until :meth:`stop`, then deregister all this agent owns (unless told not to)."""
        try:
            adopted = self.registrations.load()
            self.registry_connected = True
            self.metrics.registry_state(True)
            log.info("agent %s: %d of its instances registered already", self.config.node, adopted)
        except RegistryError as exc:
            log.warning("registry read failed at start (%s); will reconcile when it answers", exc)
        self.docker.start()
        try:
            due = time.monotonic() + jittered(self.config.resync)  # ±10 %: the fleet spreads out
            while not self._stop.is_set():
                self._wake.wait(max(min(due, self.registrations.retry_due()) - time.monotonic(), 0))
                self._wake.clear()
                if self._stop.is_set():
                    break
                with self._lock:  # a SIGHUP meanwhile is not lost (nor one kept by _reload)
                    pending, self._pending_config = self._pending_config, None
                if pending is not None and self._reload(pending) and not (
                        self.registrations.write_failed or self._reconnected):
                    # a fleet's SIGHUP comes at once (a config push): its reconcile later
                    due = min(due, time.monotonic() + spread(self.config.resync))
                    continue
                if self._reconnected:
                    self._reconnected = False
                    self.history.reconnected(list(self.registrations.written.values()))
                    # back from an outage: a random moment in a resync (a failed write: now)
                    if not self.registrations.write_failed:
                        due = time.monotonic() + spread(self.config.resync)
                        continue
                    self.registrations.retry_now()
                if (self._outage.holds_back(self.config.resync)
                        and not self.registrations.owed()):
                    # Its read would go out with the fleet's as the registry comes back; its
                    # return schedules one (above). Down longer: Outage.holds_back.
                    due = time.monotonic() + jittered(self.config.resync)
                    continue
                if self.registrations.waits(due):  # failed writes wait their turn
                    continue
                untold = self.registrations.take_failed()
                if not self.reconcile() and untold:  # still to tell at the registry's return
                    self.registrations.unread(self._outage.since is not None)  # at once then
                due = time.monotonic() + jittered(self.config.resync)
        except Exception:  # a bug: what is registered stays for a restart to adopt (or lapses)
            self._revoke = False
            raise
        finally:
            self.docker.stop()
            with self._lock:
                for tracked in self._tracked.values():
                    tracked.stop_runners()
            self._checks.stop()
            self.registrations.stop(self._revoke)
            if self._revoke:
                self.history.shut_down([key[1] for key in list(self.registrations.written)])
            self.registry.close(revoke=self._revoke)
            log.info("agent stopped (registrations %s)", "revoked" if self._revoke else "left")

    def stop(self, revoke: bool = True) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler or another thread)."""
        self._revoke = revoke
        self._stop.set()
        self._wake.set()

    def reload(self, config: AgentConfig) -> None:
        """SIGHUP: new settings, applied by the run loop (on_signals' thread, not a handler)."""
        with self._lock:
            self._pending_config = config
        self._wake.set()

    def _reload(self, config: AgentConfig) -> bool:
        config = restart_only(self.config, config)
        with self._lock:
            self._relisting = set()  # containers whose events arrive while Docker is listed
        try:
            running = self.docker.list_running()
            with self._lock:  # those events may be newer than the listing: look again
                touched, self._relisting = self._relisting or set(), None
                fresh = [a for a in running if a["Id"] not in touched]
                fresh += [a for a in map(self.docker.inspect, touched)
                          if a is not None and a.get("State", {}).get("Running")]
                self.config = config
                # re-checked instances start healthy: no flap
                self.registrations.adopt |= self.registrations.held()
                before = {k for t in self._tracked.values() for k in t.instances}
                for tracked in self._tracked.values():
                    tracked.stop_runners()
                self._tracked.clear()
                self._on_sync(fresh, wake=False)  # the run loop's reconcile: its own time
                for key in before.difference(*(t.instances for t in self._tracked.values())):
                    self.registrations.want(key, None, Cause("reload", "no longer asked for"))
        except DiscoveryError as exc:
            log.error("reload: Docker not listed (%s); the old settings stay till a retry", exc)
            with self._lock:  # tried again, unless a newer SIGHUP came meanwhile
                self._relisting = None
                self._pending_config = self._pending_config or config
            return False
        log.info("configuration reloaded")
        return True

    # ---- Docker ----------------------------------------------------------------------------
    def _on_docker(self, up: bool) -> None:
        log.info("docker %s", "connected" if up else "disconnected")
        self.metrics.docker_state(up)
        self._synced = self._synced and up  # down: listed again on its return

    def _on_registry(self, up: bool) -> None:
        """The registry's listener: records, wakes the run loop; never our lock (a deadlock)."""
        log.info("registry %s", "connected" if up else "disconnected")
        if up and not self.registry_connected:
            self._reconnected = True
        self.registry_connected = up
        self._outage.mark(up)
        self.metrics.registry_state(up)
        if up:
            self._wake.set()

    def _on_sync(self, running: list[dict[str, Any]], wake: bool = True) -> None:
        with self._lock:
            seen = set()
            for attrs in running:
                seen.add(attrs["Id"])
                self._refresh(attrs)
            for cid in list(self._tracked):
                if cid not in seen:
                    self._forget(cid, Cause("resync", "no longer running"))
            self._bad_labels = {c: e for c, e in self._bad_labels.items() if c in seen}  # bounded
            self._synced = True
        if wake:
            self.registrations.reconcile_soon()

    def _on_event(self, event: dict[str, Any]) -> None:
        action, cid, attrs = event_fields(event)
        self.metrics.docker_event(action)
        cause = Cause(action.partition(":")[0].strip() or "docker", docker_detail(action, attrs))
        # asked before the lock (REFRESHING); the events come in order, on this thread alone
        look = action in REFRESHING or (action.startswith("health") and cid not in self._tracked)
        looked = self.docker.inspect(cid) if look else None
        with self._lock:
            if self._relisting is not None:
                self._relisting.add(cid)
            tracked = self._tracked.get(cid)
            stale = tracked is not None and 0 < int(event.get("timeNano") or 0) < tracked.started_ns
            if action.startswith("health_status") and tracked is not None:
                tracked.docker_health_is(action.rsplit(":", 1)[-1].strip() == "healthy")
                self._apply_container(tracked, cause)
            elif action.startswith("health_status") or action in REFRESHING:
                self._looked(cid, looked if look else self.docker.inspect(cid), cause)
            elif action == "kill":
                if tracked is not None and not stale and tracked.killed_by(attrs.get("signal")):
                    log.info("container %s killed: draining its instances", cid[:12])
                    end = time.monotonic() + KILL_GRACE
                    self._killed[cid] = (end, cause)
                    self._apply_container(tracked, cause)
                    threading.Thread(target=self._kill_grace_over, args=(cid, end),
                                     name=f"kill-{cid[:12]}", daemon=True).start()
            elif action == "pause" and tracked is not None:
                tracked.paused = True
                self._apply_container(tracked, cause)
            elif action in ("stop", "die", "destroy") and not stale:  # not a replayed older run's
                self._forget(cid, cause)
                if action == "destroy":  # never back (kept till then: logged once a run)
                    self._bad_labels.pop(cid, None)
                    self.maint.forget(cid)  # nor its instances' ids

    def _kill_grace_over(self, cid: str, end: float) -> None:
        """Still running after its :func:`kill_grace`, it survived the kill: its check decides."""
        try:
            grace = kill_grace(self.docker.inspect(cid))
        except DiscoveryError:
            grace = KILL_GRACE
        if wait_grace(self._stop, self._killed, cid, end, grace):  # or till it died
            return
        try:  # (before the lock: see _on_event)
            looked: dict[str, Any] | DiscoveryError | None = self.docker.inspect(cid)
        except DiscoveryError as exc:
            looked = exc
        with self._lock:
            if self._killed.get(cid, (None,))[0] != end:
                return  # gone, or killed again since
            del self._killed[cid]
            if isinstance(looked, DiscoveryError):  # the listing on Docker's reconnect decides
                log.warning("container %s: %s", cid[:12], looked)
            else:  # not running or restarted: forgotten or replaced
                self._looked(cid, looked, Cause("kill", f"running {grace:g}s after it"))

    def _looked(self, cid: str, attrs: dict[str, Any] | None, cause: Cause) -> None:
        """What Docker said of ``cid`` (None: no such container) applied (the lock held)."""
        if attrs is None or not attrs.get("State", {}).get("Running"):
            self._forget(cid, cause)
        else:
            self._refresh(attrs, cause)

    def _refresh(self, attrs: dict[str, Any], cause: Cause | None = None) -> None:
        """(Re)build what we know of one running container from its inspect data."""
        cid, state = attrs["Id"], attrs.get("State", {})
        name = str(attrs.get("Name", "")).lstrip("/")
        try:
            specs = parse_container(attrs, advertise=self.config.address,
                                    internal=self.config.internal, defaults=self.config.check)
            instances = {i.key: i for i in (instance_of(attrs, s, self.config.node,
                                                        self.config.zone) for s in specs)}
        except ValidationError as exc:  # a label's (LabelError), or the record's (a long name)
            self._skip(cid, name, exc)
            return
        self._bad_labels.pop(cid, None)
        tracked = self._tracked.get(cid)
        started = iso_ns(str(state.get("StartedAt", "")))
        cause = cause or Cause("resync")
        if tracked is not None and (
            tracked.started_ns != started or not same_instances(tracked.instances, instances)
        ):
            self._forget(cid, Cause("replaced", "restarted, or its labels changed"))
            tracked = None
        if tracked is None:
            tracked = Tracked(cid, started, instances, stop_signal=stop_signal_of(attrs))
            self._tracked[cid] = tracked
            tracked.ask_warmups(specs, self.registrations.adopt)
            try:
                for spec in specs:
                    self._start_check(tracked, spec)
            except CheckError as exc:  # e.g. a plugin check missing a required label
                self._skip(cid, name, exc)
                return
        tracked.instances = instances  # (renamed, same_instances: the record follows it)
        tracked.paused = bool(state.get("Paused"))
        tracked.docker_health_is((state.get("Health") or {}).get("Status") == "healthy")
        self._apply_container(tracked, cause)

    def _skip(self, cid: str, name: str, exc: Exception) -> None:  # not registered, logged once
        if self._bad_labels.get(cid) != str(exc):
            log.error("skipping container %s: %s", name or cid[:12], exc)
            self._bad_labels[cid] = str(exc)
        self._forget(cid, Cause("skipped", str(exc)))

    def _start_check(self, tracked: Tracked, spec: ServiceSpec) -> None:
        key = (spec.service, make_instance_id(self.config.node, tracked.container_id,
                                              spec.container_port))
        adopted = key in self.registrations.adopt  # an earlier run's: start healthy, no flap
        if spec.check.type == "docker":
            return
        target = self.docker.check_target(spec.address, spec.port, tracked.container_id)
        check = build_check(spec.check, target)

        def on_transition(ok: bool, result: CheckResult, key: Key = key) -> None:
            with self._lock:
                if self._tracked.get(tracked.container_id) is not tracked:
                    return
                log.info("%s/%s is now %s (%s)", key[0], key[1], "healthy" if ok else "unhealthy",
                         result.output[:200])
                self._apply(tracked, key, Cause("check_passed" if ok else "check_failed",
                                                result.output))  # the runner holds the state

        kind = spec.check.type
        runner = CheckRunner(spec.check, check, on_transition, healthy=adopted,
                             name=f"check-{key[1]}",
                             on_result=lambda ok: self.metrics.check(kind, ok),
                             scheduler=self._checks, group=tracked.container_id)
        tracked.runners[key] = runner
        runner.start()

    def _forget(self, cid: str, cause: Cause) -> None:
        killed, tracked = self._killed.pop(cid, None), self._tracked.pop(cid, None)
        if tracked is None:
            return
        tracked.stop_runners()
        for key in tracked.instances:  # why it left: told in its history once written
            self.registrations.want(key, None, departs=killed[1] if killed else cause)

    # ---- registry --------------------------------------------------------------------------
    def _wanted(self, tracked: Tracked, key: Key) -> bool:
        if tracked.paused or key in tracked.warming or tracked.container_id in self._killed:
            return False
        runner = tracked.runners.get(key)
        return runner.healthy if runner is not None else tracked.docker_health

    def _apply_container(self, tracked: Tracked, cause: Cause) -> None:
        for key in tracked.instances:
            self._apply(tracked, key, cause)

    def _apply(self, tracked: Tracked, key: Key, cause: Cause) -> None:
        if key in tracked.warming:
            return  # _warmed applies it once the warm-up ends
        wanted = self._wanted(tracked, key)
        spec = tracked.start_warmup(key) if wanted else None
        if spec is not None:  # first time up: warm-up requests first (WarmUps: 8 at a time)
            inst = tracked.instances[key]
            self._warmups.start(f"{key[0]}/{key[1]}", inst.address, inst.port, spec,
                                lambda result: self._warmed(tracked, key, cause, result))
            return
        self.registrations.want(key, self._effective(tracked.instances[key]) if wanted else None,
                                cause)

    def _warmed(self, tracked: Tracked, key: Key, cause: Cause, result: WarmupResult) -> None:
        self.metrics.warmup(result.sent, result.errors)
        with self._lock:
            tracked.warming.discard(key)
            if self._tracked.get(tracked.container_id) is tracked and not self._stop.is_set():
                self._apply(tracked, key, Cause(cause.what, f"{cause.output[:200]} (warmed up: "
                                                f"{result.sent} requests, {result.seconds:.1f}s)"))

    def _effective(self, inst: Instance) -> Instance:  # as written: draining in maintenance
        return inst.with_state(State.DRAINING) if self.maint.active(inst.id) else inst

    def reconcile(self) -> bool:
        """Docker's truth vs the registry's view of this node, fixed both ways; False when it
        could not be made (or Docker is not listed: never delete on an unseen Docker's word)."""
        if not self._synced:
            log.debug("reconcile skipped: Docker not listed yet")
            return False
        self.forget_removed()  # (views: maintenance of containers removed while we were down)
        read_at = time.monotonic()  # what is written from now on may be missing from snap
        try:
            snap = self.registry.node_snapshot(self.config.node)  # only ours: see etcd_index
        except RegistryError as exc:
            log.warning("reconcile: registry unavailable (%s)", exc)
            return False
        # No write under way (what was written is known); its wishes keep the order of the
        # agent's decisions. Not an instance still to warm up: its check may have passed a
        # moment ago, its transition (which starts the warm-up) waiting for the lock we hold.
        with self.registrations.turn(), self._lock:
            self._adopt_late(snap)  # (views: the read at start failed)
            wanted = {key: self._effective(inst) for tracked in self._tracked.values()
                      for key, inst in tracked.instances.items()
                      if tracked.warm(key) and self._wanted(tracked, key)}
            self.registrations.reconcile(snap, wanted, read_at)
        return True
