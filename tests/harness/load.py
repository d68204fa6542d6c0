"""Steady load through a local port: N client threads, one new connection per request.

``with SteadyLoad(port) as load: ...`` runs until the block ends (bounded in requests and
time); then ``load.ok``, ``load.failed`` (refused, reset, timed out, non-200) and
``load.errors`` (the first few, for the assertion message).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from tests.harness.haproxy import http_get
from tests.harness.util import wait_for


class SteadyLoad:
    def __init__(self, port: int, clients: int = 4, max_requests: int = 40_000,
                 max_seconds: float = 120.0) -> None:
        self.port, self.clients = port, clients
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.total < self.max_requests \
                and time.monotonic() < deadline:
            try:
                status, body = http_get(self.port, timeout=5)
                error = None if status == 200 else f"HTTP {status} {body[:60]}"
            except OSError as exc:
                error = repr(exc)
            with self._lock:
                if error is None:
                    self.ok += 1
                else:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(f"{time.strftime('%H:%M:%S')} {error}")

    def __enter__(self) -> SteadyLoad:
        self._threads = [threading.Thread(target=self._client, daemon=True,
                                          name=f"load-{i}") for i in range(self.clients)]
        for t in self._threads:
            t.start()
        wait_for(lambda: self.total >= 20, 10, message="the load running")
        return self

    def wait_more(self, n: int = 200, timeout: float = 20.0) -> None:
        """Let ``n`` more requests through (the load keeps going while the test waits)."""
        target = self.total + n
        wait_for(lambda: self.total >= target, timeout, message=f"{n} more requests")

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None
                 ) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def __str__(self) -> str:
        return f"{self.ok} ok, {self.failed} failed of {self.total}: {self.errors[:5]}"
