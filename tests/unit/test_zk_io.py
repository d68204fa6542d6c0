"""discovery.registry.zk_io: kazoo's socket reads and writes with fewer system calls."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.connection import ConnectionDropped

from discovery.registry import zk_io
from discovery.registry.zk_io import PollingHandler, PreReads, fewer_syscalls


@pytest.fixture()
def conn(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A kazoo connection (never started) on one end of a socket pair, and the other end."""
    handler = PollingHandler()
    waits: list[tuple[int, int]] = []
    poll = zk_io._poll

    def counted(r: Any, w: Any, x: Any, timeout: float | None) -> Any:
        waits.append((len(r), len(w)))
        return poll(r, w, x, timeout)

    monkeypatch.setattr(zk_io, "_poll", counted)
    client = KazooClient(hosts="127.0.0.1:1", handler=handler)
    fewer_syscalls(client)
    ours, peer = socket.socketpair()
    ours.setblocking(False)  # as kazoo's own connection sets it
    client._connection._socket = ours
    client._connection._xid = 0  # as a connection sets it
    yield client._connection, peer, waits
    ours.close()
    peer.close()


def test_a_read_of_what_is_there_does_not_wait(conn: Any) -> None:
    c, peer, waits = conn
    peer.sendall(b"\0\0\0\3abc")
    assert c._read(4, 1.0) == b"\0\0\0\3"
    assert c._read(3, 1.0) == b"abc"
    assert waits == []  # kazoo waited for the socket before each recv


def test_a_read_waits_for_what_comes_later_in_parts(conn: Any) -> None:
    c, peer, waits = conn

    def send() -> None:
        peer.sendall(b"ab")
        threading.Event().wait(0.1)
        peer.sendall(b"cd")

    t = threading.Thread(target=send)
    t.start()
    assert c._read(4, 2.0) == b"abcd"
    t.join()
    assert waits and all(w == (1, 0) for w in waits)


def test_a_read_times_out_and_a_closed_peer_drops_the_connection(conn: Any) -> None:
    c, peer, _ = conn
    with pytest.raises(KazooTimeoutError):
        c._read(1, 0.1)
    peer.close()
    with pytest.raises(ConnectionDropped):
        c._read(1, 1.0)


def test_a_write_larger_than_the_socket_buffer_waits_for_the_reader(conn: Any) -> None:
    c, peer, waits = conn
    msg = bytes(range(256)) * 16384  # 4 MiB
    got = bytearray()

    def drain() -> None:  # only once the writer blocked: a reader that keeps up never lets it
        deadline = time.monotonic() + 5.0
        while not waits and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        while len(got) < len(msg):
            got.extend(peer.recv(1 << 16))

    t = threading.Thread(target=drain)
    t.start()
    c._write(msg, 5.0)
    t.join(10)
    assert bytes(got) == msg
    assert waits and all(w == (0, 1) for w in waits)  # it waited only when it would block


def test_a_small_write_does_not_wait(conn: Any) -> None:
    c, peer, waits = conn
    c._write(b"hello", 1.0)
    assert peer.recv(5) == b"hello"
    assert waits == []


def test_the_polling_handler_selects_like_kazoos() -> None:
    a, b = socket.socketpair()
    try:
        h = PollingHandler()
        assert h.select([a], [], [], 0.01) == ([], [], [])
        b.sendall(b"x")
        assert h.select([a], [b], [], 1.0) == ([a], [b], [])
    finally:
        a.close()
        b.close()


def _requests(peer: socket.socket) -> list[tuple[int, int, bytes]]:
    """(xid, opcode, body) of each request that came to ``peer`` so far."""
    peer.setblocking(False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := peer.recv(1 << 16):
            data += chunk
    out = []
    while data:
        size, xid, op = struct.unpack_from(">iii", data)
        out.append((xid, op, data[12:4 + size]))
        data = data[4 + size:]
    return out


def test_pre_reads_go_in_one_request_once_nothing_more_is_there_to_read(conn: Any) -> None:
    """Queued reads wait while the socket still has something to read (more events); then
    one GetData, or one multiRead, goes, and each answer reaches its path's callback."""
    c, peer, _ = conn
    client = c.client
    timeouts: list[float] = []
    submit = c._submit
    c._submit = lambda request, timeout, xid: (timeouts.append(timeout),
                                               submit(request, timeout, xid))
    pre = PreReads(client, lambda: 1.25)
    got: list[tuple[str, Any, Any, int]] = []

    def done(path: str) -> Any:
        return lambda read, error, zxid: got.append((path, read, error, zxid))

    pre.add("/a", done("/a"))
    peer.sendall(b"more")  # not read yet: the reads wait
    assert client.handler.select([c._socket], [], [], 1.0)[0] == [c._socket]
    assert _requests(peer) == []
    c._socket.recv(4)
    pre.add("/b", done("/b"))
    assert client.handler.select([c._socket], [], [], 0.01) == ([], [], [])
    [(xid, op, _)] = _requests(peer)
    assert op == 22 and not pre.queued  # one multiRead of both
    request, answer, pending_xid = client._pending.popleft()
    assert pending_xid == xid and [o.path for o in request.ops] == ["/a", "/b"]
    client.last_zxid = 7
    stat = object()
    answer.set([(b"x", stat), NoNodeError()])
    assert got[0] == ("/a", (b"x", stat), None, 7)
    assert got[1][0] == "/b" and isinstance(got[1][2], NoNodeError) and got[1][1] is None
    pre.add("/c", done("/c"))
    client.handler.select([c._socket], [], [], 0.01)
    [(_, op, body)] = _requests(peer)
    assert op == 4 and b"/c" in body  # one path: a GetData
    _, answer, _ = client._pending.popleft()
    answer.set_exception(ConnectionDropped("gone"))
    assert got[2][0] == "/c" and isinstance(got[2][2], ConnectionDropped)
    assert timeouts == [1.25, 1.25]  # each write timed by the granted figure, as kazoo's


def test_pre_reads_wait_for_more_events_at_most_max_wait(conn: Any, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A storm of events never leaves the socket empty: a read queued ``MAX_WAIT`` s ago
    goes though more is there to read."""
    c, peer, _ = conn
    now = [100.0]
    monkeypatch.setattr(zk_io.time, "monotonic", lambda: now[0])
    pre = PreReads(c.client, lambda: 1.0)
    pre.add("/a", lambda *_: None)
    peer.sendall(b"more")
    assert c.client.handler.select([c._socket], [], [], 1.0)[0] == [c._socket]
    assert _requests(peer) == []  # waits for the events behind
    now[0] += zk_io.MAX_WAIT + 0.001
    c.client.handler.select([c._socket], [], [], 1.0)
    assert [op for _, op, _ in _requests(peer)] == [4] and not pre.queued


def test_pre_reads_refuse_a_handler_that_would_never_send_them() -> None:
    from kazoo.handlers.threading import SequentialThreadingHandler

    client = KazooClient(hosts="127.0.0.1:1", handler=SequentialThreadingHandler())
    with pytest.raises(TypeError, match="PollingHandler"):
        PreReads(client, lambda: 1.0)
