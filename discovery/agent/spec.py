"""What the agent derives from one container: the services it offers and how to check them.

Produced by :mod:`discovery.agent.labels`, consumed by the agent and :mod:`discovery.agent.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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


@dataclass(frozen=True)
class CheckTarget:
    """What a check probes: the advertised address/port and the container (for exec)."""

    address: str
    port: int
    container_id: str
    docker: Any = None  # a docker.DockerClient, for exec checks


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    output: str = ""


class Check(Protocol):
    """One health check. Built by a factory ``(CheckSpec, CheckTarget) -> Check``
    registered in entry-point group ``discovery.checks``; ``run`` is called every interval
    from a worker thread and must return within ``spec.timeout`` (or soon after)."""

    def run(self) -> CheckResult: ...
