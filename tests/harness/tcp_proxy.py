"""A TCP proxy on a loopback port whose links tests cut, refuse, stall or slow down."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator

from tests.harness.servers import HOST


class TcpProxy:
    """Listens on a free loopback port and relays to ``target``.

    ``cut()`` drops every current connection; ``blocked()`` (a context manager) also refuses
    new ones (accept and close at once) until it exits. ``stalled()`` (a context manager) is
    a partition without resets: connections stay open but nothing is relayed either way, and
    new ones are accepted but not connected upstream, until it exits; then what was held
    flows on. ``delay`` (seconds, settable at any time) holds every chunk that long in each
    direction before relaying it: ``delay=0.1`` adds 200 ms to every round trip.
    """

    def __init__(self, target: tuple[str, int], delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._blocked = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True).start()

    def url(self, scheme: str, prefix: str) -> str:
        return f"{scheme}://{HOST}:{self.port}{prefix}"

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if self._blocked.is_set():
                down.close()
                continue
            with self._lock:
                self._conns.add(down)
            threading.Thread(target=self._connect, args=(down,), daemon=True).start()

    def _connect(self, down: socket.socket) -> None:
        self._flowing.wait()  # stalled: accepted, not connected upstream
        try:
            up = socket.create_connection(self.target, timeout=2)
            up.settimeout(None)
        except OSError:
            self._drop(down)
            return
        with self._lock:
            live = down in self._conns and not self._blocked.is_set()
            if live:
                self._conns.add(up)
        if not live:  # cut (or blocked) while connecting
            self._drop(up)
            self._drop(down)
            return
        for a, b in ((down, up), (up, down)):
            chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
            threading.Thread(target=self._read, args=(a, chunks), daemon=True).start()
            threading.Thread(target=self._write, args=(a, b, chunks), daemon=True).start()

    def _read(self, src: socket.socket,
              chunks: queue.SimpleQueue[tuple[float, bytes] | None]) -> None:
        try:
            while data := src.recv(65536):
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            chunks.put(None)  # the writer relays what is queued, then closes both ends

    def _write(self, src: socket.socket, dst: socket.socket,
               chunks: queue.SimpleQueue[tuple[float, bytes] | None]) -> None:
        try:
            while (item := chunks.get()) is not None:
                due, data = item
                self._flowing.wait()
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()

    def connections(self) -> int:
        """The sockets open through this proxy now (both ends of each connection)."""
        with self._lock:
            return len(self._conns)

    def cut(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        self._blocked.set()
        self.cut()
        try:
            yield
        finally:
            self._blocked.clear()

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._flowing.set()
        self.cut()
