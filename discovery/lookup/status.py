"""What ``/v1/health`` reports: the components of an agent and of a watcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from discovery.watcher.outlier import health as outlier_health

if TYPE_CHECKING:
    from discovery.agent.core import Agent
    from discovery.watcher.core import Watcher

Health = Callable[[], dict[str, dict[str, Any]]]  # what /v1/health reports
#: (instance id or None for the node, on) → (the ids whose state changed, the ids asked for that
#: another maintenance still holds: the node's and an instance's own are apart)
Maint = Callable[[str | None, bool], tuple[list[str], list[str]]]
Checks = Callable[[], list[dict[str, Any]]]  # the agent's live checks (/v1/agent/checks)


def watcher_health(watcher: Watcher, prefix: str = "") -> Health:
    """Components of a watcher: registry, catalog and (with a router) HAProxy."""

    def health() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {
            "registry": {"ok": bool(watcher.registry_connected),
                         "url": str(watcher.registry.url)},
            "catalog": {"ok": watcher.catalog.loaded, "index": watcher.catalog.index,
                        "instances": watcher.catalog.size()},
            "wipe_guard": _guard(watcher),
        }
        router = watcher.router
        if router is not None:
            stats = router.stats
            running = getattr(router.control, "running", True)
            out["haproxy"] = {
                "ok": bool(running) and (not stats.history or stats.history[-1] != "failed"),
                "running": bool(running), "reloads": stats.reloads,
                "runtime_ops": stats.runtime_ops, "last_reload": stats.last_reload or None,
                "last_error": stats.last_error or None,
                "render_errors": stats.render_errors, "haproxy_errors": stats.haproxy_errors,
            }
            out["outliers"] = outlier_health(router.outliers)
        return {prefix + k: c for k, c in out.items()}

    return health


def _guard(watcher: Watcher) -> dict[str, Any]:
    """ok stays true while the guard holds: serving the last known instances is the point."""
    status = watcher.guard.status
    return {"ok": True, "enabled": watcher.guard.settings.enabled,
            "wiping": watcher.guard.wiping(), "holding": status.holding,
            "held_services": watcher.guard.held_services(), "settling": status.settling,
            "engaged": status.engaged, "last_engaged": status.last_engaged}


def agent_health(agent: Agent, prefix: str = "") -> Health:
    """Components of an agent: Docker and the registry. ``prefix`` (e.g. ``"agent_"``) keeps
    them apart from a watcher's in one process (``discovery up``)."""

    def health() -> dict[str, dict[str, Any]]:
        status = agent.status()
        return {
            prefix + "docker": {"ok": bool(status.get("docker_connected")),
                                "containers": status.get("containers")},
            prefix + "registry": {"ok": bool(status.get("registry_connected")),
                                  "url": str(agent.registry.url),
                                  "registered": status.get("registered")},
        }

    return health
