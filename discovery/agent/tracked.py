"""What the agent keeps per running container, and small helpers on Docker's data."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from discovery.agent.health import CheckRunner
from discovery.agent.spec import ServiceSpec, WarmupSpec
from discovery.model import Instance, make_instance_id

#: events after which Docker is asked about the container: before the agent's lock, which every
#: check's transition takes (a slow dockerd's 10 s must not hold every container's checks)
REFRESHING = ("start", "restart", "unpause", "rename")
#: a kill with one of these drains a container whatever its stop signal: SIGKILL ends it,
#: SIGTERM and SIGINT end most programs (any other only when it is the container's stop signal,
#: what ``docker stop`` sends: SIGQUIT for nginx, SIGWINCH for httpd, SIGRTMIN+3 for systemd)
ENDING = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})
#: Docker's real-time signal numbers on Linux (moby/sys/signal: ``RTMIN`` 34 ... ``RTMAX`` 64)
RTMIN, RTMAX = 34, 64
_RT = re.compile(r"RT(MIN|MAX)([+-]\d{1,2})?")
#: seconds a container drained on a terminating signal may keep running before it is wanted
#: again (it survived the signal): at least this, or its stop timeout (``docker stop`` waits
#: that long, 10 s by default, before its SIGKILL) and 5 s more; ``docker stop -t N`` with a
#: longer N than both is not seen
KILL_GRACE = 60.0


def signal_number(value: object) -> int | None:
    """A signal as Docker gives one (a kill event's number; a stop signal's number or name,
    ``SIG`` or not, any case, ``RTMIN+3`` too) as its number; None if it is not one."""
    text = str(value).strip().upper()
    if text.isascii() and text.isdigit() and len(text) <= 3:
        return int(text) if 0 < int(text) <= RTMAX else None
    name = text.removeprefix("SIG")
    if m := _RT.fullmatch(name):
        number = (RTMIN if m[1] == "MIN" else RTMAX) + int(m[2] or 0)
        return number if RTMIN <= number <= RTMAX else None
    try:
        return int(signal.Signals["SIG" + name])
    except KeyError:
        return None


def stop_signal_of(attrs: dict[str, Any]) -> int:
    """The signal ``docker stop`` sends a container (its inspect ``attrs``): its
    ``Config.StopSignal`` (its image's ``STOPSIGNAL``, or ``--stop-signal``), else SIGTERM."""
    given = (attrs.get("Config") or {}).get("StopSignal")
    return (signal_number(given) if given else None) or signal.SIGTERM


def terminating(sig: object, stop_signal: int) -> bool:
    """Whether a kill event's ``signal`` ends a container whose stop signal is
    ``stop_signal``: :data:`ENDING`, or that stop signal (``docker stop``). Any other (HUP, a
    reload; QUIT, a JVM's thread dump) is not: draining on one took a container that goes on
    serving out of rotation for :data:`KILL_GRACE`, and ``docker stop`` of one whose stop
    signal is none of those did not drain it. A kill without a signal, or one that is no signal
    Docker knows, drains (as before: a drain too many costs the grace, one too few requests)."""
    if sig is None or sig == "":
        return True
    number = signal_number(sig)
    return number is None or number in ENDING or number == stop_signal


def kill_grace(attrs: dict[str, Any] | None) -> float:
    """Seconds a container (its inspect ``attrs``) drained on a kill signal gets to die."""
    stop_timeout = ((attrs or {}).get("Config") or {}).get("StopTimeout")
    return max(KILL_GRACE, stop_timeout + 5.0 if isinstance(stop_timeout, int) else 0.0)


def wait_grace(stop: threading.Event, killed: dict[str, tuple[float, Any]], cid: str,
               end: float, grace: float) -> bool:
    """Wait out ``grace`` seconds from the kill of ``cid`` recorded in ``killed`` as ``end``
    (the kill's time + :data:`KILL_GRACE`), or until ``killed`` holds that kill no more (the
    container died, or was killed again), looked at each second: a thread a kill no longer
    waits a minute once its container is gone. True if ``stop`` was set meanwhile."""
    until = end - KILL_GRACE + grace
    while killed.get(cid, (None,))[0] == end and (left := until - time.monotonic()) > 0:
        if stop.wait(min(left, 1.0)):
            return True
    return stop.is_set()


Key = tuple[str, str]


@dataclass
class Tracked:
    """One running container the agent looks after, and the instances it offers."""

    container_id: str
    started_ns: int
    instances: dict[Key, Instance] = field(default_factory=dict)
    runners: dict[Key, CheckRunner] = field(default_factory=dict)
    docker_health: bool = False  # set through docker_health_is: its ``since`` follows
    docker_since: float | None = None  # wall-clock time of its last change (or first look)
    paused: bool = False
    stop_signal: int = signal.SIGTERM  # what docker stop sends it (stop_signal_of)
    warmups: dict[Key, WarmupSpec] = field(default_factory=dict)  # discovery.warmup.* asked
    warming: set[Key] = field(default_factory=set)  # warm-up under way: not registered yet
    warmed: set[Key] = field(default_factory=set)  # had theirs (or adopted): no warm-up again

    def docker_health_is(self, healthy: bool) -> None:
        """Docker's own health check said ``healthy`` (an event, or a look at the container)."""
        if healthy != self.docker_health or self.docker_since is None:
            self.docker_since = time.time()
        self.docker_health = healthy

    def killed_by(self, sig: object) -> bool:
        """Whether a kill event's ``signal`` ends this container (:func:`terminating`)."""
        return terminating(sig, self.stop_signal)

    def failed(self, key: Key) -> bool:
        """Whether ``key``'s check ran and its last result failed (the last that was one: a
        "no result" after a failure hid it)."""
        runner = self.runners.get(key) if key in self.instances else None
        last = runner.last_known if runner is not None else None
        return last is not None and not last.ok

    def adopt(self, keys: Collection[Key]) -> None:
        """Its instances among ``keys`` were registered by an earlier run, seen only now (the
        registry did not answer at the agent's start): as at a start that saw them, their
        checks are healthy and they need no warm-up (one under way no longer holds them)."""
        for key in self.instances.keys() & set(keys):
            if (runner := self.runners.get(key)) is not None:
                runner.assume_healthy()
            self.warmed.add(key)
            self.warming.discard(key)

    def ask_warmups(self, specs: list[ServiceSpec], adopted: set[Key]) -> None:
        """Note the warm-ups ``specs`` (in ``instances``' order) ask; ``adopted`` instances
        (registered by an earlier run) are warm already."""
        for spec, key in zip(specs, self.instances, strict=True):
            if spec.warmup is not None:
                self.warmups[key] = spec.warmup
            if key in adopted:
                self.warmed.add(key)

    def start_warmup(self, key: Key) -> WarmupSpec | None:
        """The warm-up ``key`` needs before its first registration (marked under way), or
        ``None``: none asked, already had, or under way."""
        spec = self.warmups.get(key)
        if spec is None or key in self.warmed:
            return None
        self.warmed.add(key)
        self.warming.add(key)
        return spec

    def warm(self, key: Key) -> bool:
        """False while ``key`` still needs its warm-up: asked and not had yet, or under way."""
        return key not in self.warming and (key not in self.warmups or key in self.warmed)

    def stop_runners(self) -> None:
        for runner in self.runners.values():
            runner.stop()  # never waits: its callback takes the agent lock we hold
        self.runners.clear()


def iso_ns(stamp: str) -> int:
    """Docker's RFC 3339 nano timestamp → ns since epoch (0 if unparsable)."""
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        secs = datetime.fromisoformat(head + "+00:00").timestamp()
        return int(secs) * 1_000_000_000 + int((frac + "000000000")[:9])
    except ValueError:
        return 0


def same_instances(a: dict[Key, Instance], b: dict[Key, Instance]) -> bool:
    """The same instances but maybe for the container's name (a rename: the record follows it,
    written again as it is; the container is not replaced, drained nor checked again)."""
    return a.keys() == b.keys() and all(
        replace(a[k], container_name=b[k].container_name).same_registration(b[k]) for k in a)


def check_views(tracked: Iterable[Tracked], registered: set[Key],
                in_maint: Callable[[str], bool], flapping: list[str]) -> list[dict[str, Any]]:
    """``GET /v1/agent/checks``: per instance its check type, health, last output, since."""
    out = []
    for t in tracked:
        for key in t.instances:
            runner = t.runners.get(key)
            result = runner.last_result if runner is not None else None
            out.append({
                "service": key[0], "id": key[1],
                "type": runner.spec.type if runner is not None else "docker",
                "healthy": runner.healthy if runner is not None else t.docker_health,
                "registered": key in registered,
                "maintenance": in_maint(key[1]),
                "flapping": key[1] in flapping,
                "output": result.output if result is not None else (
                    "docker health: " + ("healthy" if t.docker_health else "not healthy")),
                "since": runner.since if runner is not None else t.docker_since,
            })
    return sorted(out, key=lambda c: (c["service"], c["id"]))


def instance_of(attrs: dict[str, Any], spec: ServiceSpec, node: str, zone: str) -> Instance:
    """The record one service of a container (its inspect data ``attrs``) registers as."""
    cid = attrs["Id"]
    return Instance(
        service=spec.service, id=make_instance_id(node, cid, spec.container_port), node=node,
        address=spec.address, port=spec.port, tags=spec.tags, weight=spec.weight,
        meta=spec.meta, container_id=cid, container_name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(attrs.get("Config", {}).get("Image", "")), zone=spec.zone or zone)
