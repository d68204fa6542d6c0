"""Warm-up requests: what the agent sends a new instance before it first registers it.

As App Engine's ``/_ah/warmup``, but as many requests as the app needs: a container labelled
``discovery.warmup.requests=N`` gets, once its checks pass for the first time after it
started, N ``GET <path>`` requests on its registered address and port (``concurrency`` at a
time, each with a short timeout, all within the ``timeout`` budget), and only then its record.
Whatever answers count (any status; connection errors too, counted apart); when the budget runs
out it is registered anyway. HTTP only, whatever its check type (tcp, http, exec, docker).

:func:`warm_up` does the requests (blocking; ``bench/deploys.py`` calls it too);
:class:`WarmUps`, the agent's, runs them at most ``MAX_RUNNING`` at a time and calls back.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from discovery.agent.spec import WarmupSpec, label_count, label_duration
from discovery.errors import LabelError

log = logging.getLogger(__name__)

#: the ``discovery.warmup.<field>`` labels
FIELDS = frozenset({"requests", "path", "concurrency", "timeout"})
MAX_REQUESTS, MAX_CONCURRENCY, MAX_TIMEOUT, MAX_PATH = 10_000, 16, 300.0, 256
#: longest one warm-up request may take (less when the budget has less left)
REQUEST_TIMEOUT = 5.0
_READ_CAP = 1 << 20  # bytes of one answer read (the rest is dropped with the connection)
_GRACE = 1.0  # after the budget: for workers to return once their connections are cut
#: warm-ups under way at once in one agent (the others wait, within their budget): at most
#: MAX_RUNNING x (1 + MAX_CONCURRENCY) threads, whatever the number of new instances
MAX_RUNNING = 8


def parse(values: dict[str, tuple[str, str]]) -> WarmupSpec | None:
    """The warm-up asked by ``values`` (field -> (label value, culprit)); ``None`` when
    ``requests`` is absent or 0 (the others are checked all the same). Raises
    :class:`LabelError` naming the bad label."""
    def number(name: str, low: int, high: int) -> int:
        value, culprit = values[name]
        return label_count(culprit, value, low, high)

    requests = number("requests", 0, MAX_REQUESTS) if "requests" in values else 0
    fields: dict[str, Any] = {"requests": requests}
    if "path" in values:
        path, culprit = values["path"]
        if not (path.startswith("/") and len(path) <= MAX_PATH
                and all(33 <= ord(c) < 127 for c in path)):
            raise LabelError(culprit, f"must start with /, be printable ASCII without spaces and "
                             f"at most {MAX_PATH} characters")
        fields["path"] = path
    if "concurrency" in values:
        fields["concurrency"] = number("concurrency", 1, MAX_CONCURRENCY)
    if "timeout" in values:
        value, culprit = values["timeout"]
        fields["timeout"] = label_duration(culprit, value, minimum=0.1, maximum=MAX_TIMEOUT)
    return WarmupSpec(**fields) if requests else None


@dataclass(frozen=True)
class WarmupResult:
    sent: int  # requests made (answered or not)
    errors: int  # of them, those that got no HTTP answer (refused, reset, timed out)
    seconds: float
    complete: bool  # False: the budget ran out (or the agent stopped) first


def warm_up(address: str, port: int, spec: WarmupSpec, stop: threading.Event | None = None,
            asked: float | None = None) -> WarmupResult:
    """Send ``spec.requests`` GETs of ``spec.path`` to ``address:port``, ``spec.concurrency``
    at a time, within ``spec.timeout`` seconds (of ``asked``, monotonic, if given): requests
    still under way then are cut off, so it blocks that long at most (and a moment). Never
    raises for what the app does; a worker thread that cannot start is one fewer."""
    start = time.monotonic() if asked is None else asked
    deadline = start + spec.timeout
    lock = threading.Lock()
    counts = {"issued": 0, "errors": 0}
    socks: set[socket.socket] = set()  # of requests under way: shut down at the deadline
    cut = threading.Event()

    def one(timeout: float) -> bool:
        """One warm-up request: True if it got an HTTP answer (any status)."""
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
        sock = None
        try:
            conn.connect()
            with lock:
                if cut.is_set():
                    return False
                sock = conn.sock
                socks.add(sock)
            conn.request("GET", spec.path, headers={"Connection": "close",
                                                    "User-Agent": "discovery-warmup"})
            resp = conn.getresponse()
            resp.read(_READ_CAP)
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            with lock:
                socks.discard(sock)
            conn.close()

    def worker() -> None:
        while not (stop is not None and stop.is_set()):
            with lock:
                if counts["issued"] >= spec.requests or time.monotonic() >= deadline:
                    return
                counts["issued"] += 1
            if not one(max(0.05, min(REQUEST_TIMEOUT, deadline - time.monotonic()))):
                with lock:
                    counts["errors"] += 1

    threads = []
    for n in range(min(spec.concurrency, spec.requests)):
        t = threading.Thread(target=worker, name=f"warmup-{port}-{n}", daemon=True)
        try:
            t.start()
        except RuntimeError as exc:  # at the pids limit: those started do the requests
            log.warning("warm-up of %s:%d: %d of %d workers (%s)", address, port, n,
                        spec.concurrency, exc)
            break
        threads.append(t)
    for t in threads:  # one deadline for all
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:  # a slow app (an answer trickling in) holds no worker past the deadline
        cut.set()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    for t in threads:  # a connect under way ends by its timeout, at the deadline at most
        t.join(max(0.0, deadline + _GRACE - time.monotonic()))
    with lock:
        sent, errors = counts["issued"], counts["errors"]
    done = sent >= spec.requests and not any(t.is_alive() for t in threads)
    return WarmupResult(sent, errors, time.monotonic() - start, done)


class WarmUps:
    """One agent's warm-ups: at most ``running`` at once (a container of hundreds of services
    started hundreds, each with its own workers: threads without bound), the others queued,
    each within its budget from when it was asked (then registered, warmed or not). Its
    threads are daemons, started as needed and ended once nothing waits; once ``stop`` is set
    a queued warm-up sends nothing and logs nothing."""

    def __init__(self, stop: threading.Event | None = None, running: int = MAX_RUNNING) -> None:
        self._stop, self._running = stop, running
        self._lock = threading.Lock()
        self._queue: deque[Callable[[], None]] = deque()
        self._threads = 0

    def start(self, name: str, address: str, port: int, spec: WarmupSpec,
              done: Callable[[WarmupResult], None]) -> None:
        """:func:`warm_up` in its turn; logs its outcome, then calls ``done`` (at once, from
        here, if no thread can be had for it: the pids limit; registered anyway)."""
        job = functools.partial(self._run, name, address, port, spec, done, time.monotonic())
        with self._lock:
            self._queue.append(job)
            if self._threads >= self._running:
                return
            self._threads += 1
        try:
            threading.Thread(target=self._work, name="warmup", daemon=True).start()
        except RuntimeError as exc:
            with self._lock:
                self._threads -= 1
                mine = job in self._queue  # (else another thread took it: it runs there)
                if mine:
                    self._queue.remove(job)
            if mine:
                log.warning("%s: warm-up not started (%s); registering it anyway", name, exc)
                done(WarmupResult(0, 0, 0.0, False))

    def _work(self) -> None:
        while True:
            with self._lock:  # (leaving with the queue seen empty, at once: start() sees it)
                if not self._queue:
                    self._threads -= 1
                    return
                job = self._queue.popleft()
            try:
                job()
            except BaseException:  # (_run catches the rest) the worker goes on: the queue waits
                log.exception("warm-up worker")  # on it (its place counted)

    def _run(self, name: str, address: str, port: int, spec: WarmupSpec,
             done: Callable[[WarmupResult], None], asked: float) -> None:
        if self._stop is not None and self._stop.is_set():
            return  # the agent stops: nothing to register
        try:
            result = warm_up(address, port, spec, self._stop, asked)
        except Exception:  # a bug: logged, and the instance registered all the same
            log.exception("%s: warm-up failed", name)
            result = WarmupResult(0, 0, time.monotonic() - asked, False)
        if result.complete:
            log.info("%s warmed up: %d requests to %s in %.2fs, %d errors", name, result.sent,
                     spec.path, result.seconds, result.errors)
        elif self._stop is None or not self._stop.is_set():
            log.warning("%s: warm-up stopped after %d of %d requests to %s (%d errors) at its "
                        "%gs budget; registering it anyway", name, result.sent, spec.requests,
                        spec.path, result.errors, spec.timeout)
        try:
            done(result)
        except Exception:
            log.exception("%s: after warm-up", name)
