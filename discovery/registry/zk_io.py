"""kazoo's connection thread with fewer system calls, each of which lets go of the GIL.

A kazoo client's connection thread reads and writes its socket. Every system call lets go of
the GIL, and taking it back waits while another thread of the process runs, up to the 5 ms
switch interval. kazoo 2.11 makes many calls a message:

- its ``select`` builds an epoll selector at every turn of the loop: ``epoll_create``, an
  ``epoll_ctl`` a socket, the wait, a ``close``. :class:`PollingHandler` waits in one
  ``poll`` instead (it registers in user space);
- it waits for the socket before each ``recv`` and ``send`` though the socket is
  non-blocking. :func:`fewer_syscalls` tries the ``recv`` or ``send`` first, and waits only
  when it would block.

In a process with other busy threads (a watcher serving DNS, many registries) a change took
several of those waits to arrive. Measured: 125 hosts' registries in one process, one change
followed by all, CPU a delivery from ~2.5 ms to ~1.5 ms, context switches from ~100 to ~45
(docs/benchmarks.md).
"""

from __future__ import annotations

import selectors
import ssl
from typing import Any

from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import selector_select
from kazoo.protocol.connection import ConnectionDropped

_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _PollSelectors:
    """What :func:`kazoo.handlers.utils.selector_select` needs of the selectors module, with
    ``poll`` as the selector."""

    EVENT_READ, EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
    DefaultSelector = selectors.PollSelector


class PollingHandler(SequentialThreadingHandler):
    """kazoo's threading handler, whose ``select`` is one ``poll`` call."""

    def select(self, *args: Any, **kwargs: Any) -> Any:
        return selector_select(*args, selectors_module=_PollSelectors, **kwargs)


def fewer_syscalls(client: Any) -> None:
    """Make ``client``'s connection read and write its (non-blocking) socket at once, and wait
    for it only when that would block. Errors and time-outs are kazoo's own."""
    conn = client._connection
    handler = client.handler

    def wait(readable: bool, timeout: float, what: str) -> None:
        sock = conn._socket
        ready = handler.select([sock] if readable else [], [] if readable else [sock], [],
                               timeout)
        if not ready[0 if readable else 1]:
            raise handler.timeout_exception(f"socket time-out during {what}")

    def read(length: int, timeout: float) -> bytes:
        parts: list[bytes] = []
        remaining = length
        with conn._socket_error_handling():
            while remaining > 0:
                try:
                    chunk = conn._socket.recv(remaining)
                except _WOULD_BLOCK:
                    wait(True, timeout, "read")
                    continue
                if not chunk:
                    raise ConnectionDropped("socket connection broken")
                parts.append(chunk)
                remaining -= len(chunk)
        return b"".join(parts)

    def write(msg: bytes, timeout: float) -> None:
        view, sent = memoryview(msg), 0
        with conn._socket_error_handling():
            while sent < len(msg):
                try:
                    n = conn._socket.send(view[sent:])
                except _WOULD_BLOCK:
                    wait(False, timeout, "write")
                    continue
                if not n:
                    raise ConnectionDropped("socket connection broken")
                sent += n

    conn._read, conn._write = read, write
