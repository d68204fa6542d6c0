"""What the agent derives from one container: the services it offers and how to check them.

Produced by :mod:`discovery.agent.labels`, consumed by the agent and :mod:`discovery.agent.checks`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from discovery.errors import LabelError, ValidationError
from discovery.model.durations import format_duration, parse_duration

#: Longest check interval and timeout (seconds): a hung probe holds a worker at most this long.
MAX_INTERVAL = 60.0
#: Shortest interval of an ``exec`` check (seconds): each run is a process in the container.
MIN_EXEC_INTERVAL = 1.0
#: Checks of one container that may run at once (the agent has 8 shared check workers).
PER_CONTAINER_CHECKS = 2


@dataclass(frozen=True)
class CheckSpec:
    """How to decide an instance is healthy.

    ``type``: ``docker`` (follow the container's own HEALTHCHECK), ``tcp``, ``http``,
    ``exec``, ``none``, or the name of a plugin in entry-point group ``discovery.checks``.
    ``params``: type-specific strings (http: ``path``, ``status``; exec: ``command``; plugins: any).
    """

    type: str = "tcp"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 1
    fall: int = 2
    params: dict[str, str] = field(default_factory=dict)


def within_limits(
    spec: CheckSpec, culprit: Callable[[str], str], timeout_given: bool = True
) -> CheckSpec:
    """``spec`` if it keeps the limits, else :class:`ValidationError` naming ``culprit(field)``.

    ``timeout`` <= ``interval`` <= 60 s, ``interval`` >= 1 s for ``exec`` checks, ``rise`` and
    ``fall`` whole numbers in 1..100 (as their labels). A timeout
    that was not given explicitly (``timeout_given=False``: the 1 s default) is shortened to
    the interval instead of refused.
    """
    for name in ("rise", "fall"):
        count = getattr(spec, name)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100:
            raise ValidationError(culprit(name), f"{str(count)[:32]!r} is not a whole number "
                                  "in 1..100")
    if not 0 < spec.interval <= MAX_INTERVAL:
        raise ValidationError(culprit("interval"), f"{spec.interval:g}s is not between 0 and "
                              f"the limit of {format_duration(MAX_INTERVAL)}")
    if not timeout_given:
        spec = replace(spec, timeout=min(spec.timeout, spec.interval))
    if spec.timeout <= 0:
        raise ValidationError(culprit("timeout"), f"{spec.timeout:g}s is not a positive duration")
    if spec.timeout > spec.interval:
        raise ValidationError(culprit("timeout"), f"{spec.timeout:g}s is longer than the "
                              f"interval ({spec.interval:g}s): a run must end before the next")
    if spec.type == "exec" and spec.interval < MIN_EXEC_INTERVAL:
        raise ValidationError(culprit("interval"), f"{spec.interval:g}s is too short for an exec "
                              f"check (at least {format_duration(MIN_EXEC_INTERVAL)})")
    return spec


def label_count(culprit: str, value: str, low: int = 1, high: int = 100) -> int:
    """A label's whole number (ASCII digits) in ``low..high``, else :class:`LabelError`."""
    text = value.strip()
    if not re.fullmatch("[0-9]{1,6}", text) or not low <= int(text) <= high:
        raise LabelError(culprit, f"{value[:32]!r} is not a whole number in {low}..{high}")
    return int(text)


def label_duration(culprit: str, value: str, minimum: float = 0.05,
                   maximum: float = MAX_INTERVAL) -> float:
    """A label's duration (``"2s"``, ``"500ms"``, ``"1m"``, plain seconds) in
    ``minimum..maximum``, else :class:`LabelError`."""
    try:
        return parse_duration(culprit, value, minimum=minimum, maximum=maximum)
    except ValidationError as exc:
        raise LabelError(culprit, exc.reason) from None


@dataclass(frozen=True)
class WarmupSpec:
    """Warm-up requests the agent sends before it first registers an instance
    (``discovery.warmup.*``): ``requests`` GETs of ``path`` (0: off), ``concurrency`` at a
    time, all within ``timeout`` seconds. See :mod:`discovery.agent.warmup`."""

    requests: int = 0
    path: str = "/"
    concurrency: int = 2
    timeout: float = 30.0


@dataclass(frozen=True)
class ServiceSpec:
    """One service port of one container, ready to become an :class:`~discovery.model.Instance`."""

    service: str
    container_port: int
    address: str
    port: int
    tags: tuple[str, ...] = ()
    weight: int = 100
    meta: dict[str, str] = field(default_factory=dict)
    check: CheckSpec = field(default_factory=CheckSpec)
    zone: str = ""  # discovery.zone label; "": the agent's --zone
    warmup: WarmupSpec | None = None  # discovery.warmup.* labels; None: no warm-up


@dataclass(frozen=True)
class CheckTarget:
    """What a check probes: the advertised address/port and the container (for exec)."""

    address: str
    port: int
    container_id: str
    docker: Any = None  # a docker.DockerClient, for exec checks
    reach: Any = None  # their agent's checks.DockerReach (None: one of the check's own)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    output: str = ""
    #: no result: what the check goes through could not be reached (dockerd, for ``exec``):
    #: the health state stays as it is (a failure would deregister serving containers)
    unknown: bool = False


class Check(Protocol):
    """One health check. Built by a factory ``(CheckSpec, CheckTarget) -> Check``
    registered in entry-point group ``discovery.checks``; ``run`` is called every interval
    from a worker thread and must return within ``spec.timeout`` (or soon after)."""

    def run(self) -> CheckResult: ...
