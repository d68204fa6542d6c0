"""The HTTP API's request handler: reads one request off the socket (whole within
``Handler.timeout``, however slowly it comes), refuses bodies and repeated guard headers, and
sends :meth:`discovery.lookup.http.HttpApi.handle`'s answer."""

from __future__ import annotations

import io
import logging
import select
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from time import monotonic
from typing import Any

from discovery.lookup.http_guard import TOKEN_HEADER
from discovery.lookup.http_listen import ApiServer
from discovery.lookup.http_query import Request, Response

log = logging.getLogger(__name__)

ONE_VALUE = {"host", "authorization", TOKEN_HEADER.lower()}  # given twice: 400


class Handler(BaseHTTPRequestHandler):
    """Moves bytes between a connection and :meth:`HttpApi.handle` (``server.api``)."""

    server: ApiServer
    #: seconds a client may take to send its whole request, from the accept (not per read: a
    #: byte every few seconds kept a thread for ever), and to take each answer
    timeout = 10.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # http.server's reader: each read has the whole timeout
        self.rfile = io.BufferedReader(_Deadline(self.connection, monotonic() + self.timeout,
                                                 self.timeout))

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
        names = [name.lower() for name in self.headers]
        repeated = sorted({n for n in names if n in ONE_VALUE and names.count(n) > 1})
        if repeated:
            self.close_connection = True
            self._send(api.error(400, f"header {repeated[0]!r} given more than once"), send_body)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        self._send(api.handle(Request(self.path, method, headers, self.client_address[0],
                                      self._gone)), send_body)

    def _gone(self) -> bool:
        """Has the client hung up (EOF or error on the socket)? Never blocks."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN | select.POLLERR | select.POLLHUP)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""  # else: a pipelined request
        except (OSError, ValueError):
            return True

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


class _Deadline(io.RawIOBase):
    """``sock``'s reads, each within what is left until ``deadline`` (a ``monotonic()``
    time), else :class:`TimeoutError`; the socket keeps ``timeout`` for the writes."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        super().__init__()
        self.sock, self.deadline, self.timeout = sock, deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - monotonic()
        if left <= 0:
            raise TimeoutError("the request did not come whole within its time")
        self.sock.settimeout(min(left, self.timeout))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)
