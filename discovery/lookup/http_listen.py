"""The HTTP API's listening server: a thread per request, on a socket it binds or inherits
from the previous process (:mod:`discovery.lookup.handover`), and a stop that can leave that
socket to the next process after answering every request it accepted."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() never waits on a slow client
    # accept queue: socketserver's 5 made a burst of connections (Prometheus' consul_sd opens
    # one blocking query per service at once) wait on SYN retries, seconds each
    request_queue_size = 1024
    api: Any  # the HttpApi answering

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 inherited: socket.socket | None = None) -> None:
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

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._busy:
            self._requests += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
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
