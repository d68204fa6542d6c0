"""The HTTP API: catalog lookups with Consul-style blocking queries, health, metrics.

``GET /v1/services``, ``GET /v1/services/<name>``, ``GET /v1/health``, ``GET /metrics``, the
agent's ``PUT /v1/agent/maint``, and Consul's read API and Prometheus SD (:mod:`consul`;
docs/http.md). Stdlib only (``http.server``), one daemon
thread per request, loopback by default. Every answer is JSON (metrics aside); errors are
``{"error": ..., "param": ...}``, never a traceback. What is refused before answering (foreign
Host headers, writes without the token, too many blocking queries) is in :mod:`http_guard`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from discovery.errors import ConfigError, DiscoveryError, ValidationError
from discovery.lookup import consul, ui
from discovery.lookup.http_guard import (
    HOW_TO_TOKEN,
    TOKEN_HEADER,
    dump_json,
    host_allowed,
    presented_token,
    token_matches,
)
from discovery.lookup.http_handler import Handler
from discovery.lookup.http_listen import ApiServer
from discovery.lookup.http_query import (
    ApiError,
    Request,
    Response,
    allow,
    blocking_params,
    filters,
    flag,
    parse_query,
    up_only,
)
from discovery.lookup.http_whole import WholeCatalog
from discovery.lookup.peers import Slots
from discovery.lookup.status import Checks, Health, Maint
from discovery.model import validate as v

if TYPE_CHECKING:
    from discovery.metrics import Metrics
    from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_BIND, DEFAULT_PORT = "127.0.0.1", 8500
MAX_TARGET = 4096  # bytes of request target
WAIT_SLICE = 0.5  # blocking waits wake this often to notice stop() and a client hanging up
SERVICE_PARAMS = {"index", "wait", "tag", "up", "passing", "pretty", "zone"}
#: blocking queries at once, in all and per client (an IPv4 address, an IPv6 /64). Each holds a
#: thread (a few tens of KiB resident) for up to 5 min. Per client as Consul's
#: http_max_conns_per_client (200) and more: Prometheus' consul_sd holds one per service it
#: watches, from one address.
MAX_BLOCKING, MAX_BLOCKING_PER_CLIENT = 1024, 512
#: connections open at once, in all and per client: each holds a thread, a slow client's too
#: (it has Handler.timeout to send its request). Room for every blocking query and 256 (128
#: per client) other requests besides; beyond either, 503 (in all) or 429 (per client).
MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT = MAX_BLOCKING + 256, MAX_BLOCKING_PER_CLIENT + 128


def parse_listen(value: str) -> tuple[str, int]:
    """``--http`` value → (ip, port): ``PORT``, ``:PORT``, ``IP:PORT``, ``[IPv6]:PORT``;
    without an address the API binds loopback."""
    return v.listen("--http", value, localhost=True)


class HttpApi:
    """Serves ``catalog`` (None in an agent: no ``/v1/services``), ``health()`` and
    ``metrics`` on ``bind:port`` (port 0: any free one, see :attr:`port` after start)."""

    def __init__(self, catalog: Catalog | None, health: Health, metrics: Metrics | None = None,
                 bind: str = DEFAULT_BIND, port: int = DEFAULT_PORT, *,
                 max_blocking: int = MAX_BLOCKING,
                 max_blocking_per_client: int = MAX_BLOCKING_PER_CLIENT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                 maint: Maint | None = None, checks: Checks | None = None,
                 token: str | None = None, datacenter: str = consul.DEFAULT_DATACENTER,
                 node: str = "", views: ui.Views | None = None,
                 contact: consul.Contact | None = None) -> None:
        self.catalog, self.health, self.metrics = catalog, health, metrics
        self.views = views  # the status page's sources (GET /ui/, /v1/agent/history)
        if contact is None and views is not None and views.watcher is not None:
            contact = consul.Contact.of(views.watcher)  # the registry connection, for Consul
        self.consul = (consul.ConsulApi(catalog, self.block, datacenter, node, contact)
                       if catalog is not None else None)
        self._whole = WholeCatalog(catalog) if catalog is not None else None  # /v1/services
        self.maint = maint  # the agent's maintenance switch (PUT /v1/agent/maint)
        self.checks = checks  # the agent's live check state (GET /v1/agent/checks)
        self.token = token  # writes need it; None: writes are refused
        self.bind, self._port = bind, port
        self.slots = Slots(max_blocking, max_blocking_per_client, "blocking queries")
        self.connections = Slots(max_connections, max_connections_per_client, "connections")
        self._stopping = threading.Event()
        self._server: ApiServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def blocked(self) -> int:
        """Blocking queries waiting right now."""
        return self.slots.used

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    def start(self, inherited: socket.socket | None = None) -> HttpApi:
        """Bind (a ConfigError naming the address when it cannot) and serve on a daemon
        thread; ``inherited``: the listening socket of a previous process, served as it is."""
        if self._server is not None:
            return self
        self._stopping.clear()
        try:
            self._server = ApiServer((self.bind, self._port), Handler, self.connections,
                                     inherited)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {self.bind} port {self._port}: "
                              f"{exc.strerror or exc}") from None
        self._server.api = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name=f"http-api-{self.port}", daemon=True)
        self._thread.start()
        if not _loopback(self.bind):
            log.warning("HTTP API on %s:%d is reachable from the network (reads need no "
                        "authentication%s)", self.bind, self.port,
                        "" if self.token else "; writes are refused: no --http-token-file")
        log.info("HTTP API listening on %s:%d", self.bind, self.port)
        return self

    def listeners(self) -> list[tuple[str, socket.socket]]:
        """The listening socket, to hand over to the next process."""
        return [] if self._server is None else [("http", self._server.socket)]

    def stop(self, handoff: bool = False) -> None:
        """Stop serving; blocked queries return within a second. ``handoff``: the next
        process serves the same socket; every request accepted here is answered first."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            self._port = server.server_address[1]
            server.shutdown()
            if handoff:
                server.wait_idle(WAIT_SLICE + 5.0)
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # ---- requests (socket-free: the handler only moves bytes) ------------------------------
    def handle(self, req: Request | str) -> Response:
        """Answer one request (a bare target: ``GET`` it from loopback); never raises."""
        if isinstance(req, str):
            req = Request(req)
        try:
            host = req.headers.get("host")
            if not host_allowed(host):
                raise ApiError(421, f"Host {(host or '')[:80]!r} is not an IP address or "
                                    "localhost: refused, as a DNS rebinding guard (address "
                                    "this API by IP)")
            if req.method == "PUT":
                self._authorize(req.headers)
            if len(req.target) > MAX_TARGET:
                raise ApiError(414, f"request target longer than {MAX_TARGET} bytes")
            try:
                path = urlsplit(req.target).path
            except ValueError:  # e.g. "http://[" (an unclosed IPv6 literal): the client's error
                raise ApiError(400, "malformed request target") from None
            if path == "/v1/agent/maint":
                return self._maint(req.target, req.method)
            if req.method == "PUT":
                raise ApiError(405, "PUT is only for /v1/agent/maint")
            return self._route(req)
        except ApiError as exc:
            return self.error(exc.status, exc.message, exc.param, exc.headers)
        except Exception:
            log.exception("HTTP API: %s failed", req.target[:200])
            return self.error(500, "internal error (see the server log)")

    def error(self, status: int, message: str, param: str | None = None,
              headers: dict[str, str] | None = None) -> Response:
        body = {"error": message, **({"param": param} if param is not None else {})}
        return Response(status, dump_json(body, pretty=False), headers=headers or {})

    def _authorize(self, headers: Mapping[str, str]) -> None:
        """Writes need the token; without one configured they are refused outright."""
        if self.token is None:
            raise ApiError(403, f"writes are disabled: this process has no HTTP token; "
                                f"{HOW_TO_TOKEN}")
        presented = presented_token(headers)
        challenge = {"WWW-Authenticate": 'Bearer realm="discovery"'}
        if presented is None:
            raise ApiError(401, f"this write needs the token: send {TOKEN_HEADER}: TOKEN or "
                                "Authorization: Bearer TOKEN", headers=challenge)
        if not token_matches(presented, self.token):
            raise ApiError(401, "wrong token", headers=challenge)

    def _route(self, req: Request) -> Response:
        parts = urlsplit(req.target)  # checked by handle()
        query = parse_query(parts.query)
        path = parts.path
        if path == "/metrics":
            return self._metrics()
        if path == "/v1/agent/checks" and self.checks is not None:
            allow(query, {"pretty"})
            return Response(200, dump_json(self.checks(), flag(query, "pretty")))
        if path == "/v1/health":
            allow(query, {"pretty"})
            return self._health(flag(query, "pretty"))
        if path == "/v1/services" or path.startswith("/v1/services/"):
            name = unquote(path[len("/v1/services/"):]) if path != "/v1/services" else None
            if self.catalog is None:
                raise ApiError(404, "this process has no catalog (an agent's API serves "
                                    "/v1/health, /metrics, /v1/agent/* and /ui/)")
            return self._services(self.catalog, name, query, req)
        if ui.handles(path):
            return ui.route(self, path, query)
        if consul.handles(path) and self.consul is not None:
            return self.consul.route(path, query, req)
        if consul.unsupported(path):  # a 404 reads as "absent" to Consul's clients
            raise consul.not_implemented(path, "" if self.consul is not None else
                                         "this process has no catalog (an agent): Consul's "
                                         "reads are served by watch, dns and up --http")
        raise ApiError(404, f"no such endpoint: {path[:100]} (see /v1/services, /v1/health)")

    def _services(self, catalog: Catalog, name: str | None, query: dict[str, list[str]],
                  req: Request) -> Response:
        allow(query, SERVICE_PARAMS)
        tags = filters(name, query)
        zone = query.get("zone", [""])[0]
        if zone:
            try:
                v.dns_label("zone", zone)
            except ValidationError as exc:
                raise ApiError(400, str(exc), "zone") from None
        only_up = up_only(query)
        pretty = flag(query, "pretty")
        index = self.block(catalog, req, *blocking_params(query), name)  # before the data
        if not catalog.loaded:  # an empty answer would read as "every instance is gone"
            raise ApiError(503, "the catalog has not loaded its first snapshot from the "
                                "registry yet (see /v1/health); retry",
                           headers={"Retry-After": "1"})
        if name is None and not (tags or zone or only_up or pretty) and self._whole is not None:
            body = self._whole.body()  # (kept by service: a change costs its service's JSON)
            return Response(200, body, headers={"X-Discovery-Index": str(index)})
        found = [i.to_dict() for i in catalog.instances(name, tags=tags,
                                                        include_draining=not only_up)
                 if not zone or i.zone == zone]
        data: Any = found
        if name is None:
            data = {"services": {}}
            for inst in found:
                data["services"].setdefault(inst["service"], []).append(inst)
        return Response(200, dump_json(data, pretty), headers={"X-Discovery-Index": str(index)})

    def block(self, catalog: Catalog, req: Request, index: int | None, wait: float,
              service: str | None = None) -> int:
        """Wait while the catalog (with ``service``: that service) has not changed since
        ``index``; return the index to answer with. One service's query waits for a change of
        that service, not of any (a fleet's churn woke every blocked query on every host).

        An index ahead of ours (a client of a restarted watcher) answers at once, so the
        client resets, as Consul clients do when the index goes backwards. The slot is
        given back as soon as the client hangs up (checked every WAIT_SLICE).
        """
        current = catalog.modified(service)
        if index is None or index > catalog.index:  # none, or a restarted process's
            return current
        if index < current or wait <= 0:
            return max(index, current)  # never behind what it was given
        refused = self.slots.acquire(req.client)
        if refused is not None:
            raise ApiError(429, refused.message, headers={"Retry-After": "1"})
        try:
            deadline = time.monotonic() + wait
            while not self._stopping.is_set() and not req.gone():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if catalog.wait(index, min(remaining, WAIT_SLICE), service) > index:
                    break
            return max(index, catalog.modified(service))  # never behind what it was given
        finally:
            self.slots.release(req.client)

    def _health(self, pretty: bool) -> Response:
        try:
            components = self.health()
            if not isinstance(components, dict):
                raise TypeError(f"health() returned {type(components).__name__}, not dict")
            components = {str(k): dict(c) if isinstance(c, dict) else {"ok": bool(c)}
                          for k, c in components.items()}
            healthy = all(bool(c.get("ok", False)) for c in components.values())
            body: dict[str, Any] = {"healthy": healthy, "components": components}
        except Exception as exc:
            log.warning("HTTP API: health callback failed: %s", exc)
            healthy, body = False, {"healthy": False, "components": {},
                                    "error": f"health unavailable: {type(exc).__name__}"}
        body["time"] = time.time()
        return Response(200 if healthy else 503, dump_json(body, pretty))

    def _maint(self, target: str, method: str) -> Response:
        """``PUT /v1/agent/maint?enable=true|false[&id=INSTANCE]``: no id → the whole node."""
        if method != "PUT":
            raise ApiError(405, "use PUT /v1/agent/maint?enable=true|false[&id=INSTANCE]")
        if self.maint is None:
            raise ApiError(404, "maintenance is an agent endpoint (discovery agent --http)")
        query = parse_query(urlsplit(target).query)
        allow(query, {"enable", "id", "pretty"})
        enable = query.get("enable", [""])[-1].lower()
        if enable not in ("true", "false"):
            raise ApiError(400, "enable must be true or false", "enable")
        ids = query.get("id", [])
        try:
            changed, held = self.maint(ids[-1] if ids else None, enable == "true")
        except DiscoveryError as exc:
            raise ApiError(404, str(exc), "id") from None
        return Response(200, dump_json({"maintenance": enable == "true",
                                        "instances": changed, "held": held},
                                       flag(query, "pretty")))

    def _metrics(self) -> Response:
        if self.metrics is None:
            raise ApiError(404, "metrics are not enabled in this process")
        if self.catalog is not None:
            self.metrics.catalog(self.catalog.size(), self.catalog.index)
        return Response(200, self.metrics.exposition(), self.metrics.content_type)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
