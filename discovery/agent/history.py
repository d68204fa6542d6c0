"""Each instance's health history on this agent: its last transitions, each with a time and a
cause, kept after the instance has left (bounded), with flapping flagged.

A transition is a change of the instance's state as the agent sees it: ``up`` and
``draining`` (registered as such), ``down`` (alive but not registered: check failing, Docker
health not healthy, paused) and ``gone`` (the container left: the history then moves to the
departed, so the cause of a departure can still be read). A few events that leave the state
as it was are recorded too (``reregistered``, ``registry_reconnected``); flapping counts only
state changes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from discovery.errors import ConfigError

if TYPE_CHECKING:
    from discovery.model import Instance

PER_INSTANCE = 100  # transitions kept per instance
DEPARTED = 1000  # departed instances whose history is kept
FLAP_COUNT, FLAP_WINDOW = 5, 60.0  # more than 5 state changes in 60 s: flapping
MAX_OUTPUT = 300  # characters of a check's output kept per transition


@dataclass(frozen=True)
class Cause:
    """Why the agent (re)considered an instance: ``what`` is a short token (``check_passed``,
    ``check_failed``, ``docker_health``, ``kill``, ``stop``, ``die``, ``pause``, ``start``,
    ``maintenance_on``, ``maintenance_off``, ``reregistered``, ``shutdown``…), ``output`` the
    check's output or a detail, ``at`` when the agent saw it (the record's ``seen_at``)."""

    what: str
    output: str = ""
    at: float = field(default_factory=time.time)


#: noted even though the state stays as it was
EVENTS = frozenset({"reregistered", "registry_reconnected"})
LOST = "the registry had lost it (session expiry or lease loss)"


@dataclass
class _Entry:
    service: str
    node: str
    transitions: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=PER_INSTANCE))
    state: str = ""
    left_at: float | None = None

    def flapping(self, now: float) -> bool:
        changes = sum(1 for t in self.transitions
                      if t["changed"] and now - t["at"] <= FLAP_WINDOW)
        return changes > FLAP_COUNT

    def to_dict(self, iid: str, now: float) -> dict[str, Any]:
        return {"id": iid, "service": self.service, "node": self.node, "state": self.state,
                "live": self.left_at is None, "left_at": self.left_at,
                "flapping": self.flapping(now),
                "transitions": [{k: v for k, v in t.items() if k != "changed"}
                                for t in self.transitions]}


class History:
    """Thread-safe; every method is cheap (called under the agent's lock and by the thread
    that writes to the registry)."""

    def __init__(self, per_instance: int = PER_INSTANCE, departed: int = DEPARTED) -> None:
        self.per_instance, self.departed_max = per_instance, departed
        self._lock = threading.RLock()
        self._live: dict[str, _Entry] = {}
        self._departed: OrderedDict[str, _Entry] = OrderedDict()

    def record(self, service: str, iid: str, node: str, state: str, cause: Cause,
               live: bool = False) -> bool:
        """Note ``state`` for an instance; a no-op (False) when it is the state it already had,
        unless the cause is one of :data:`EVENTS` (worth keeping though nothing changed), or
        with ``live`` when the instance has left."""
        with self._lock:
            entry = self._live.get(iid)
            if entry is None and live:
                return False
            if entry is None:
                entry = self._departed.pop(iid, None)  # the same container came back
                if entry is None:
                    entry = _Entry(service, node, deque(maxlen=self.per_instance))
                entry.left_at = None
                self._live[iid] = entry
            changed = state != entry.state
            if not changed and cause.what not in EVENTS:
                return False
            flap = changed and entry.state != ""  # the first state seen is no flap
            entry.state = state
            entry.transitions.append({"at": time.time(), "state": state, "cause": cause.what,
                                      "output": cause.output[:MAX_OUTPUT], "changed": flap})
            return True

    def depart(self, iid: str, cause: Cause) -> None:
        """The instance left: note ``gone`` with ``cause`` and keep its history (bounded)."""
        with self._lock:  # (re-entered by record: nothing recorded between the two)
            entry = self._live.get(iid)
            if entry is None:
                return
            self.record(entry.service, iid, entry.node, "gone", cause)
            entry = self._live.pop(iid, entry)
            entry.left_at = time.time()
            self._departed[iid] = entry
            while len(self._departed) > self.departed_max:
                self._departed.popitem(last=False)

    def reconnected(self, instances: list[Instance]) -> None:
        """The registry is back after a disconnection: its client re-puts every record if the
        session or lease expired meanwhile."""
        cause = Cause("registry_reconnected", "records re-put if the session or lease expired")
        for inst in instances:  # one departed (its delete failed, or told meanwhile) stays so
            self.record(inst.service, inst.id, inst.node, inst.state.value, cause, live=True)

    def shut_down(self, ids: list[str]) -> None:
        """The agent stops and revokes its registrations."""
        for iid in ids:
            self.depart(iid, Cause("shutdown", "deregistered at shutdown"))

    def state(self, iid: str) -> str:
        with self._lock:
            entry = self._live.get(iid)
            return entry.state if entry is not None else ""

    def query(self, iid: str | None = None, service: str | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
        """Histories (live first, then departed, newest departure first), of one instance or
        one service; :class:`ConfigError` when that instance or service is unknown here.
        ``limit``: the last N transitions of each."""
        now = time.time()
        with self._lock:
            pool = [*sorted(self._live.items()), *reversed(self._departed.items())]
            out = [e.to_dict(i, now) for i, e in pool
                   if (iid is None or i == iid) and (service is None or e.service == service)]
        if not out and iid is not None:
            raise ConfigError(f"instance {iid[:80]!r}: no history on this agent")
        if not out and service is not None:
            raise ConfigError(f"service {service[:80]!r}: no instance of it on this agent")
        if limit is not None:
            for item in out:
                item["transitions"] = item["transitions"][-limit:] if limit else []
        return out

    def flapping(self) -> list[str]:
        now = time.time()
        with self._lock:
            return sorted(i for i, e in self._live.items() if e.flapping(now))


def docker_detail(action: str, attrs: dict[str, Any]) -> str:
    """What a Docker event says about its cause: the signal of a kill, a die's exit code."""
    if action == "kill":
        return f"signal {attrs.get('signal', '?')}"
    if action == "die":
        return f"exit code {attrs.get('exitCode', '?')}"
    return action
