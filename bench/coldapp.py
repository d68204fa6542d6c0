"""A model service instance that starts cold, for ``bench/deploys.py``'s slow-start phase.

One model for every mode, so the modes differ only in what discovery does with it:

* **preload** (time-driven: loading code, filling caches from disk, opening pools): for
  ``preload_s`` after the process starts, a request's service time falls linearly from
  ``cold_ms`` to ``warm_ms``. With ``readiness``, ``GET /health`` answers 503 until the preload
  is done (an app that reports ready only once it has warmed what it can warm alone); without
  it, ``/health`` answers 200 from the start, as a TCP check or a naive ``/health`` does.
* **residual** (request-driven: lazily filled caches, the JIT of the hot paths, what only real
  traffic warms): its first ``residual_n`` requests take ``residual_ms`` falling linearly to
  ``warm_ms``, whenever they come (requests served during the preload count too). A request
  takes the larger of the two.
* **capacity**: ``workers`` requests are served at a time, the others wait (a CPU-bound app
  with 2 cores), so an instance handed more than it can serve queues.

A warm instance is the same model with ``preload_s = 0`` and ``residual_n = 0``. Every answer's
body is the instance's name, as the harness's ``NamedBackend``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Model:
    warm_ms: float = 5.0
    cold_ms: float = 150.0
    preload_s: float = 8.0
    residual_n: int = 200
    residual_ms: float = 25.0
    workers: int = 2
    readiness: bool = False

    def service_s(self, since_start: float, served: int) -> float:
        """Service time of a request that starts ``since_start`` s after the process, after
        ``served`` earlier requests."""
        preload = self.warm_ms
        if since_start < self.preload_s:
            preload = self.cold_ms - (self.cold_ms - self.warm_ms) * since_start / self.preload_s
        residual = self.warm_ms
        if served < self.residual_n:
            drop = (self.residual_ms - self.warm_ms) * served / self.residual_n
            residual = self.residual_ms - drop
        return max(preload, residual) / 1000.0

    def ready(self, since_start: float) -> bool:
        return not self.readiness or since_start >= self.preload_s


WARM = Model(preload_s=0.0, residual_n=0)


class ColdApp:
    """The model served over HTTP on ``host``: ``/health`` and any other path (the traffic)."""

    def __init__(self, name: str, model: Model, host: str = "127.0.0.1") -> None:
        self.name, self.model = name, model
        self.started = time.monotonic()
        self.served = 0
        self._lock = threading.Lock()
        self._workers = threading.Semaphore(model.workers)
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.partition("?")[0] == "/health":
                    status = 200 if app.model.ready(time.monotonic() - app.started) else 503
                else:
                    status = 200
                    with app._workers:
                        with app._lock:
                            served, app.served = app.served, app.served + 1
                        time.sleep(app.model.service_s(time.monotonic() - app.started, served))
                body = app.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
