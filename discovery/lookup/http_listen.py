"""The HTTP API's listening server: a thread per connection, within a cap in all and per client
(beyond it: 503 or 429, then closed), on a socket it binds or inherits from the previous process
(:mod:`discovery.lookup.handover`), and a stop that can leave that socket to the next process
after answering every request it accepted."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from discovery.lookup.http_guard import dump_json
from discovery.lookup.peers import TOTAL, Hushed, Refusal, Slots

log = logging.getLogger(__name__)


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() never waits on a slow client
    # accept queue: socketserver's 5 made a burst of connections (Prometheus' consul_sd opens
    # one blocking query per service at once) wait on SYN retries, seconds each
    request_queue_size = 1024
    api: Any  # the HttpApi answering

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 connections: Slots, inherited: socket.socket | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler, bind_and_activate=inherited is None)
        if inherited is not None:
            self.socket.close()
            self.socket = inherited
            self.server_address = inherited.getsockname()[:2]
        # two processes may accept during a handover: accept() must never wait
        self.socket.setblocking(False)
        self._busy = threading.Condition()
        self._requests = 0
        self.connections = connections  # a slot per connection, from accept to close
        self._hushed = Hushed(log)  # refusals and failures: a line a minute per cause

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot, else answer 503 or 429 and close (logged once a minute
        per cause, not per connection)."""
        refused = self.connections.acquire(str(client_address[0]))
        if refused is None:
            return True
        self._hushed.warn(refused.cause, "HTTP API: connection from %s refused: %s",
                          client_address[0], refused)
        _refuse(request, refused)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._busy:
            self._requests += 1
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:  # no thread for it (the pids limit): closed, as DNS does
            self._done(client_address)
            self._hushed.warn("threads", "HTTP API: connection from %s closed: %s",
                              client_address[0], exc)
            self.shutdown_request(request)
        except BaseException:
            self._done(client_address)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An error serving a connection: a client gone is a debug line; anything else is
        logged with its traceback at most once a minute (socketserver wrote a traceback of
        13 lines to stderr each time)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("HTTP API: connection from %s: %s", client_address[0], exc)
        else:
            self._hushed.warn("error", "HTTP API: connection from %s failed",
                              client_address[0], trace=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(client_address)

    def _done(self, client_address: Any) -> None:
        self.connections.release(str(client_address[0]))
        with self._busy:
            self._requests -= 1
            self._busy.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted request is answered (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._busy:
            while self._requests > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._busy.wait(left)
        return True


def _refuse(request: socket.socket, refused: Refusal) -> None:
    """Tell a connection beyond the cap why, without waiting on it: what it sent so far is read
    (a close over unread bytes resets the connection, which may discard the answer) and the
    answer is sent if the socket buffer takes it at once."""
    status = HTTPStatus.SERVICE_UNAVAILABLE if refused.cause == TOTAL else \
        HTTPStatus.TOO_MANY_REQUESTS
    body = dump_json({"error": refused.message}, pretty=False)
    head = (f"HTTP/1.0 {status.value} {status.phrase}\r\nServer: discovery\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    with contextlib.suppress(OSError):  # BlockingIOError: nothing sent yet
        request.recv(65536, socket.MSG_DONTWAIT)
    with contextlib.suppress(OSError):
        request.send(head.encode() + body, socket.MSG_DONTWAIT)
