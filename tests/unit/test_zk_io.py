"""discovery.registry.zk_io: kazoo's socket reads and writes with fewer system calls."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.connection import ConnectionDropped

from discovery.registry.zk_io import PollingHandler, fewer_syscalls


@pytest.fixture()
def conn() -> Any:
    """A kazoo connection (never started) on one end of a socket pair, and the other end."""
    handler = PollingHandler()
    waits: list[tuple[int, int]] = []
    select = handler.select

    def counted(r: Any, w: Any, x: Any, timeout: float) -> Any:
        waits.append((len(r), len(w)))
        return select(r, w, x, timeout)

    handler.select = counted  # type: ignore[method-assign]
    client = KazooClient(hosts="127.0.0.1:1", handler=handler)
    fewer_syscalls(client)
    ours, peer = socket.socketpair()
    ours.setblocking(False)  # as kazoo's own connection sets it
    client._connection._socket = ours
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

    def drain() -> None:
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
