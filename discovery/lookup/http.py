"""The HTTP API: catalog lookups with Consul-style blocking queries, health, metrics.

``GET /v1/services``, ``GET /v1/services/<name>``, ``GET /v1/health``, ``GET /metrics``
(docs/http.md). Stdlib only (``http.server``), one daemon thread per request, loopback by
default. Every answer is JSON (metrics aside); errors are ``{"error": ..., "param": ...}``,
never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from discovery.errors import DiscoveryError, ValidationError
from discovery.lookup.status import Checks, Health, Maint
from discovery.model import validate as v
from discovery.model.durations import parse_duration

if TYPE_CHECKING:
    from discovery.metrics import Metrics
    from discovery.model.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_BIND, DEFAULT_PORT = "127.0.0.1", 8500
MAX_WAIT = 300.0  # longer waits are capped, as Consul caps at 10 minutes
MAX_TARGET = 4096  # bytes of request target
MAX_PARAMS = 32
WAIT_SLICE = 1.0  # blocking waits wake this often to notice stop()
SERVICE_PARAMS = {"index", "wait", "tag", "up", "passing", "pretty"}
TRUE, FALSE = {"", "1", "true", "yes"}, {"0", "false", "no"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def parse_listen(value: str) -> tuple[str, int]:
    """``--http`` value → (ip, port): ``PORT``, ``:PORT``, ``IP:PORT``, ``[IPv6]:PORT``;
    without an address the API binds loopback."""
    return v.listen("--http", value, localhost=True)


class HttpApi:
    """Serves ``catalog`` (None in an agent: no ``/v1/services``), ``health()`` and
    ``metrics`` on ``bind:port`` (port 0: any free one, see :attr:`port` after start)."""

    def __init__(self, catalog: Catalog | None, health: Health, metrics: Metrics | None = None,
                 bind: str = DEFAULT_BIND, port: int = DEFAULT_PORT, *,
                 max_blocking: int = 256, maint: Maint | None = None,
                 checks: Checks | None = None) -> None:
        self.catalog, self.health, self.metrics = catalog, health, metrics
        self.maint = maint  # the agent's maintenance switch (PUT /v1/agent/maint)
        self.checks = checks  # the agent's live check state (GET /v1/agent/checks)
        self.bind, self._port = bind, port
        self._blocking = threading.BoundedSemaphore(max_blocking)
        self._lock = threading.Lock()
        self.blocked = 0  # blocking queries waiting right now
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    def start(self) -> HttpApi:
        """Bind (raises OSError when the address is taken) and serve on a daemon thread."""
        if self._server is not None:
            return self
        server_cls = _Server6 if ":" in self.bind else _Server
        self._stopping.clear()
        self._server = server_cls((self.bind, self._port), _Handler)
        self._server.api = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name=f"http-api-{self.port}", daemon=True)
        self._thread.start()
        if not _loopback(self.bind):
            log.warning("HTTP API on %s:%d is reachable from the network (no authentication)",
                        self.bind, self.port)
        log.info("HTTP API listening on %s:%d", self.bind, self.port)
        return self

    def stop(self) -> None:
        """Stop serving; blocked queries return within a second."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            self._port = server.server_address[1]
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # ---- requests (socket-free: the handler only moves bytes) ------------------------------
    def handle(self, target: str, method: str = "GET") -> Response:
        """Answer ``METHOD target``; never raises."""
        try:
            if urlsplit(target).path == "/v1/agent/maint":
                return self._maint(target, method)
            if method == "PUT":
                raise ApiError(405, "PUT is only for /v1/agent/maint")
            return self._route(target)
        except ApiError as exc:
            return self.error(exc.status, exc.message, exc.param)
        except Exception:
            log.exception("HTTP API: %s failed", target[:200])
            return self.error(500, "internal error (see the server log)")

    def error(self, status: int, message: str, param: str | None = None) -> Response:
        body = {"error": message, **({"param": param} if param is not None else {})}
        return Response(status, _dump(body, pretty=False))

    def _route(self, target: str) -> Response:
        if len(target) > MAX_TARGET:
            raise ApiError(414, f"request target longer than {MAX_TARGET} bytes")
        parts = urlsplit(target)
        try:
            query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=MAX_PARAMS)
        except ValueError:
            raise ApiError(400, f"more than {MAX_PARAMS} query parameters") from None
        path = parts.path
        if path == "/metrics":
            return self._metrics()
        if path == "/v1/agent/checks" and self.checks is not None:
            _allow(query, {"pretty"})
            return Response(200, _dump(self.checks(), _flag(query, "pretty")))
        if path == "/v1/health":
            _allow(query, {"pretty"})
            return self._health(_flag(query, "pretty"))
        if path == "/v1/services" or path.startswith("/v1/services/"):
            name = unquote(path[len("/v1/services/"):]) if path != "/v1/services" else None
            if self.catalog is None:
                raise ApiError(404, "this process has no catalog (the agent's API only has "
                                    "/v1/health and /metrics)")
            return self._services(self.catalog, name, query)
        raise ApiError(404, f"no such endpoint: {path[:100]} (see /v1/services, /v1/health)")

    def _services(self, catalog: Catalog, name: str | None,
                  query: dict[str, list[str]]) -> Response:
        _allow(query, SERVICE_PARAMS)
        if name is not None:
            try:
                v.dns_label("service", name)
            except ValidationError as exc:
                raise ApiError(400, str(exc), "service") from None
        tags = query.get("tag", [])
        try:
            v.tags("tag", tags)
        except ValidationError as exc:
            raise ApiError(400, str(exc), "tag") from None
        up_only = _flag(query, "up") or _flag(query, "passing")
        pretty = _flag(query, "pretty")
        index = self._block(catalog, *_blocking(query))  # read before the data: never miss one
        found = [i.to_dict() for i in catalog.instances(name, tags=tags,
                                                        include_draining=not up_only)]
        data: Any = found
        if name is None:
            data = {"services": {}}
            for inst in found:
                data["services"].setdefault(inst["service"], []).append(inst)
        return Response(200, _dump(data, pretty), headers={"X-Discovery-Index": str(index)})

    def _block(self, catalog: Catalog, index: int | None, wait: float) -> int:
        """Wait while the catalog is still at ``index``; return the index to answer with.

        An index ahead of ours (a client of a restarted watcher) answers at once, so the
        client resets, as Consul clients do when the index goes backwards.
        """
        current = catalog.index
        if index is None or index != current or wait <= 0:
            return current
        if not self._blocking.acquire(blocking=False):
            raise ApiError(429, "too many blocking queries in progress; retry later")
        with self._lock:
            self.blocked += 1
        try:
            deadline = time.monotonic() + wait
            while not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                current = catalog.wait(index, min(remaining, WAIT_SLICE))
                if current != index:
                    break
            return catalog.index
        finally:
            with self._lock:
                self.blocked -= 1
            self._blocking.release()

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
        return Response(200 if healthy else 503, _dump(body, pretty))

    def _maint(self, target: str, method: str) -> Response:
        """``PUT /v1/agent/maint?enable=true|false[&id=INSTANCE]``: no id → the whole node."""
        if method != "PUT":
            raise ApiError(405, "use PUT /v1/agent/maint?enable=true|false[&id=INSTANCE]")
        if self.maint is None:
            raise ApiError(404, "maintenance is an agent endpoint (discovery agent --http)")
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        _allow(query, {"enable", "id", "pretty"})
        enable = query.get("enable", [""])[-1].lower()
        if enable not in ("true", "false"):
            raise ApiError(400, "enable must be true or false", "enable")
        ids = query.get("id", [])
        try:
            affected = self.maint(ids[-1] if ids else None, enable == "true")
        except DiscoveryError as exc:
            raise ApiError(404, str(exc), "id") from None
        return Response(200, _dump({"maintenance": enable == "true", "instances": affected},
                                   _flag(query, "pretty")))

    def _metrics(self) -> Response:
        if self.metrics is None:
            raise ApiError(404, "metrics are not enabled in this process")
        if self.catalog is not None:
            self.metrics.catalog(len(self.catalog.instances()), self.catalog.index)
        return Response(200, self.metrics.exposition(), self.metrics.content_type)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _dump(data: Any, pretty: bool) -> bytes:
    text = json.dumps(data, sort_keys=True, default=str, indent=2 if pretty else None,
                      separators=None if pretty else (",", ":"))
    return (text + "\n").encode()


def _allow(query: dict[str, list[str]], allowed: set[str]) -> None:
    for key, values in query.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, f"unknown parameter {key[:40]!r} (known: {known})", key[:40])
        if len(values) > 1 and key != "tag":
            raise ApiError(400, f"parameter {key!r} given {len(values)} times", key)


def _flag(query: dict[str, list[str]], key: str) -> bool:
    value = query[key][0].strip().lower() if key in query else "0"
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise ApiError(400, f"{key}: {value[:20]!r} is not a boolean (1|0|true|false)", key)


def _blocking(query: dict[str, list[str]]) -> tuple[int | None, float]:
    """``?index=N&wait=D`` → (N or None, seconds capped at MAX_WAIT; default MAX_WAIT)."""
    index: int | None = None
    if "index" in query:
        raw = query["index"][0].strip()
        if not raw.isdigit() or len(raw) > 18:
            raise ApiError(400, f"index: {raw[:20]!r} is not a non-negative integer "
                                "(the X-Discovery-Index of an earlier answer)", "index")
        index = int(raw)
    wait = MAX_WAIT
    if "wait" in query:
        try:
            wait = parse_duration("wait", query["wait"][0], maximum=1e12)
        except ValidationError as exc:
            raise ApiError(400, str(exc), "wait") from None
    return index, min(wait, MAX_WAIT)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() never waits on a slow client
    api: HttpApi


class _Server6(_Server):
    address_family = AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may take to send its request (or to read a write)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_PUT(self) -> None:
        self._serve(send_body=True, method="PUT")

    def _not_allowed(self) -> None:
        self._send(self.server.api.error(405, f"method {self.command} not allowed: only GET"),
                   True, {"Allow": "GET, HEAD"})

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _serve(self, send_body: bool, method: str = "GET") -> None:
        api = self.server.api
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if length != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            self._send(api.error(413, "request bodies are not accepted"), send_body)
            return
        self._send(api.handle(self.path, method), send_body)

    def _send(self, resp: Response, send_body: bool, extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in {**resp.headers, **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(resp.body)
        except OSError as exc:  # the client went away
            log.debug("HTTP API: client gone: %s", exc)
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (malformed request, line too long…) as JSON too."""
        self.close_connection = True
        if getattr(self, "request_version", "") in ("", "HTTP/0.9"):
            self.request_version = "HTTP/1.0"  # a status line and headers, even for garbage
        text = message or HTTPStatus(code).phrase
        self._send(self.server.api.error(code, text), self.command != "HEAD")

    def version_string(self) -> str:
        return "discovery"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
