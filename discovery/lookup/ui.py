"""The status page (``GET /ui/``) and the agent's health history (``GET /v1/agent/history``).

The page is three static files of ours (``ui_assets/``: HTML, CSS, a little vanilla JS; no
external asset, works offline) served with a strict Content-Security-Policy: no inline
script or style, nothing from elsewhere. The JS reads the catalog with blocking queries on
``/v1/services`` and everything else from ``/ui/status.json`` (this module), and renders
every value with ``textContent``: a registry value is text, never markup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from discovery.errors import DiscoveryError, HAProxyError, ValidationError
from discovery.lookup.http_guard import dump_json
from discovery.lookup.http_query import ApiError, Response, allow, flag
from discovery.model import validate as v

if TYPE_CHECKING:
    from discovery.lookup.status import Checks, Health
    from discovery.metrics import Metrics
    from discovery.model.catalog import Catalog
    from discovery.watcher.core import Watcher
    from discovery.watcher.router import Router

log = logging.getLogger(__name__)

class Api(Protocol):
    """What the page reads from the HTTP API it is served by (``lookup.http.HttpApi``)."""

    catalog: Catalog | None
    health: Health
    metrics: Metrics | None
    checks: Checks | None
    views: Views | None


#: (instance id, service, last N transitions) -> histories (discovery.agent.history.History)
HistoryQuery = Callable[[str | None, str | None, int | None], list[dict[str, Any]]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
ASSETS = {"": ("index.html", "text/html; charset=utf-8"),
          "index.html": ("index.html", "text/html; charset=utf-8"),
          "app.js": ("app.js", "text/javascript; charset=utf-8"),
          "app.css": ("app.css", "text/css; charset=utf-8")}
SHOWN_TRANSITIONS = 20  # per instance on the page (the API has all 100)
SHOWN_DEPARTED = 20
SHOWN_SERVERS = 64  # per backend


@dataclass
class Views:
    """What the page shows beyond the catalog: the local agent's history (None: no agent in
    this process) and the watcher (None: an agent alone), for HAProxy and propagation."""

    history: HistoryQuery | None = None
    watcher: Watcher | None = None


def handles(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/") or path == "/v1/agent/history"


def route(api: Api, path: str, query: dict[str, list[str]]) -> Response:
    """Answer ``/ui``, ``/ui/*`` and ``/v1/agent/history``."""
    views = api.views or Views()
    if path == "/v1/agent/history":
        return history(views, query)
    if path == "/ui":
        return Response(301, b"", "text/plain", {"Location": "/ui/"})
    if path == "/ui/status.json":
        allow(query, {"pretty"})
        return Response(200, dump_json(status(api, views), flag(query, "pretty")))
    asset = ASSETS.get(path[len("/ui/"):])
    if asset is None:
        raise ApiError(404, f"no such page: {path[:100]} (see /ui/)")
    body = resources.files("discovery.lookup").joinpath("ui_assets", asset[0]).read_bytes()
    return Response(200, body, asset[1], dict(PAGE_HEADERS))


def history(views: Views, query: dict[str, list[str]]) -> Response:
    """``GET /v1/agent/history[?id=INSTANCE|service=NAME]``: transitions with their causes."""
    if views.history is None:
        raise ApiError(404, "history is an agent endpoint (discovery agent --http, or up)")
    allow(query, {"id", "service", "pretty"})
    iid, service = query.get("id", [None])[0], query.get("service", [None])[0]
    try:
        if iid is not None:
            v.instance_id("id", iid)
        if service is not None:
            v.dns_label("service", service)
    except ValidationError as exc:
        raise ApiError(400, str(exc), exc.culprit) from None
    try:
        found = views.history(iid, service, None)
    except DiscoveryError as exc:
        raise ApiError(404, str(exc), "id" if iid is not None else "service") from None
    return Response(200, dump_json({"instances": found}, flag(query, "pretty")))


def status(api: Api, views: Views) -> dict[str, Any]:
    """Everything the page shows that ``/v1/services`` does not."""
    out: dict[str, Any] = {"time": time.time(), "catalog": api.catalog is not None}
    try:
        out["health"] = api.health()
    except Exception as exc:  # the page still shows the rest; the log says why
        log.warning("status page: the health callback failed", exc_info=True)
        out["health"] = {"status": {"ok": False, "error": type(exc).__name__}}
    out["checks"] = api.checks() if api.checks is not None else None
    if views.history is not None:
        found = views.history(None, None, SHOWN_TRANSITIONS)
        out["history"] = [h for h in found if h["live"]]
        out["departed"] = [h for h in found if not h["live"]][:SHOWN_DEPARTED]
    watcher = views.watcher
    if api.metrics is not None:
        stages = api.metrics.stages
        out["propagation"] = stages.summary()
        if api.catalog is not None:  # service -> id -> timing: one id may be in two services
            timings: dict[str, dict[str, Any]] = {}
            for i in api.catalog.instances():
                if (t := stages.of(i.service, i.id)) is not None:
                    timings.setdefault(i.service, {})[i.id] = t
            out["timings"] = timings
    if watcher is not None and watcher.router is not None:
        out["haproxy"] = haproxy_view(watcher.router)
        out["events"] = [{"at": at, "kind": kind, "error": text}
                         for at, kind, text in reversed(watcher.router.stats.events)]
    return out


def haproxy_view(router: Router) -> dict[str, Any]:
    """Each routed backend as HAProxy has it now (``show servers state`` + ``show stat``):
    the slots holding an instance, with admin state, health, weight and current sessions."""
    control = router.control
    if control is None:
        return {"error": "HAProxy is not controlled by this watcher"}
    try:
        runtime = control.runtime
        servers, stat = runtime.servers(), runtime.stat()
    except HAProxyError as exc:
        return {"error": str(exc)}
    backends: dict[str, Any] = {}
    for name, table in sorted(dict(router.tables).items()):
        rows = []
        for slot in table.slots():
            view, row = servers.get((name, slot.name)), stat.get((name, slot.name), {})
            if not slot.instance_id and (view is None or view.state == "maint"):
                continue  # a free slot
            rows.append({
                "slot": slot.name, "instance": slot.instance_id,
                "address": f"{view.address}:{view.port}" if view else "",
                "state": view.state if view else "absent",
                "health": view.operational if view else "", "weight": view.weight if view else 0,
                "status": row.get("status", ""), "sessions": _int(row.get("scur", "")),
                "total": _int(row.get("stot", ""))})
        backends[name] = {"slots": table.size, "used": len(rows), "servers": rows[:SHOWN_SERVERS]}
    return {"backends": backends}


def _int(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() else 0
