"""kazoo's connection thread with fewer system calls and hand-overs, each a wait for the GIL.

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

A changed node's read is sent by the connection thread itself (:class:`PreReads`), not by a
kazoo call from the follower's worker thread: fleet bench, 125 ZooKeeper hosts in one
process, CPU a delivery ~1.3 ms -> ~0.95 ms (medians of A/B runs), p99 ~200 -> ~160 ms.
"""

from __future__ import annotations

import selectors
import ssl
import time
from collections.abc import Callable
from typing import Any

from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import selector_select
from kazoo.protocol.connection import ConnectionDropped
from kazoo.protocol.serialization import GetData

from discovery.registry.zk_multi import MAX_OPS, MultiRead

_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
MAX_WAIT = 0.02  # seconds a changed node's read waits for more events to go with it


class _PollSelectors:
    """What :func:`kazoo.handlers.utils.selector_select` needs of the selectors module, with
    ``poll`` as the selector."""

    EVENT_READ, EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
    DefaultSelector = selectors.PollSelector


def _poll(rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None
          ) -> tuple[list[Any], list[Any], list[Any]]:
    result: tuple[list[Any], list[Any], list[Any]] = selector_select(
        rlist, wlist, xlist, timeout, selectors_module=_PollSelectors)
    return result


class PollingHandler(SequentialThreadingHandler):
    """kazoo's threading handler, whose ``select`` (the connection thread's wait for its
    socket, or for a request to send) is one ``poll`` call. Before it waits, it sends the
    reads of its client's :class:`PreReads`, once nothing more is there to read."""

    pre_reads: PreReads | None = None

    def select(self, rlist: list[Any], wlist: list[Any], xlist: list[Any],
               timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        pre = self.pre_reads
        if pre is not None and pre.queued:
            ready = _poll(rlist, wlist, xlist, 0)
            if any(ready) and not pre.due():  # more events: their reads in the same request
                return ready
            pre.send()
        return _poll(rlist, wlist, xlist, timeout)


def fewer_syscalls(client: Any) -> None:
    """Make ``client``'s connection read and write its (non-blocking) socket at once, and wait
    for it only when that would block. Errors and time-outs are kazoo's own."""
    conn = client._connection
    handler = client.handler  # its time-out error

    def wait(readable: bool, timeout: float, what: str) -> None:
        sock = conn._socket
        ready = _poll([sock] if readable else [], [] if readable else [sock], [], timeout)
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


#: what :meth:`PreReads.add` calls with the answer: ``(data, stat)`` or None, the error (None:
#: none; ``NoNodeError``: the node is gone) and the server's zxid when it answered
Answered = Callable[[Any, BaseException | None, int], None]


class PreReads:
    """Reads of changed nodes sent by a kazoo client's connection thread itself, its watch
    events' handler (:mod:`~discovery.registry.zk_persistent`): kazoo's own calls queue a
    request for that thread, wake it through a socket pair and wait for the answer on a
    condition, three hand-overs between threads a read, each a wait for the GIL in a busy
    process. :meth:`add` (on that thread) queues a path; before the thread waits again
    (:class:`PollingHandler`), with nothing more to read or ``MAX_WAIT`` s after the first
    was queued, the queued paths go as one
    ``GetData`` or one ``multiRead`` (the events of a dead host's nodes come together), and
    the answer, on that thread too, goes to each path's callback. Needs a
    :class:`PollingHandler` and ZooKeeper 3.6+ (persistent watches, ``multiRead``).
    ``write_timeout`` gives how long (s) a request's write may take, as kazoo times its own:
    the granted session timeout over the number of members."""

    def __init__(self, client: Any, write_timeout: Callable[[], float]) -> None:
        if not isinstance(client.handler, PollingHandler):  # no other one would ever send
            raise TypeError(f"PreReads needs a PollingHandler, not {client.handler!r}")
        self._client, self._write_timeout = client, write_timeout
        self._queued: list[tuple[str, Answered]] = []
        self._since = 0.0  # when the first of them was queued
        client.handler.pre_reads = self

    @property
    def queued(self) -> bool:
        return bool(self._queued)

    def due(self) -> bool:
        """Send now, though more may be there to read: a full request, or the first path
        queued ``MAX_WAIT`` s ago (a storm of events never leaves the socket empty)."""
        return (len(self._queued) >= MAX_OPS
                or time.monotonic() - self._since >= MAX_WAIT)

    def add(self, path: str, done: Answered) -> None:
        if not self._queued:
            self._since = time.monotonic()
        self._queued.append((path, done))

    def send(self) -> None:
        """Send what is queued (the connection thread, with a connection): raises what the
        socket's write raises, after each callback had the error."""
        batch, self._queued = self._queued, []
        ops = [GetData(path, None) for path, _ in batch]
        request = ops[0] if len(ops) == 1 else MultiRead(ops)
        client = self._client
        conn = client._connection
        conn._xid = xid = (conn._xid % 2147483647) + 1  # as kazoo numbers its own requests
        answer = _Answer(client, batch)
        try:
            conn._submit(request, self._write_timeout(), xid)
        except Exception as exc:
            answer.set_exception(exc)
            raise
        client._pending.append((request, answer, xid))


class _Answer:
    """What kazoo's connection thread sets with the answer to a request it sent."""

    def __init__(self, client: Any, batch: list[tuple[str, Answered]]) -> None:
        self._client, self._batch = client, batch

    def set(self, value: Any = None) -> None:
        zxid = self._client.last_zxid
        answers = [value] if len(self._batch) == 1 else value
        for (_, done), answer in zip(self._batch, answers, strict=True):
            if isinstance(answer, BaseException):
                done(None, answer, zxid)
            else:
                done(answer, None, zxid)

    def set_exception(self, exc: BaseException) -> None:
        for _, done in self._batch:
            done(None, exc, self._client.last_zxid)
