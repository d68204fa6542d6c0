"""Raw registry clients, for what the registry code never does: a value written bypassing it
(``raw_put``), a ZooKeeper session expired server side (``expire_zk_session``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from discovery.registry.url import RegistryURL
from tests.harness.servers import wait_until


def raw_put(url: str, key: str, value: bytes) -> None:
    """Write ``value`` at ``key`` (etcd key / ZooKeeper path) bypassing the registry code."""
    parsed = RegistryURL.parse(url)
    host, port = parsed.hosts[0]
    if parsed.scheme == "etcd":
        import pyetcd

        client = pyetcd.client(host, port, timeout=5)
        try:
            client.put(key, value)
        finally:
            client.close()
        return
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=",".join(f"{h}:{p}" for h, p in parsed.hosts), timeout=5)
    zk.start(timeout=10)
    try:
        if zk.exists(key):
            zk.set(key, value)
        else:
            zk.create(key, value, makepath=True)
    finally:
        zk.stop()
        zk.close()


class _KazooLike(Protocol):
    hosts: Any
    client_id: Any

    def add_listener(self, listener: Callable[[Any], Any]) -> None: ...


def expire_zk_session(client: _KazooLike, timeout: float = 30.0) -> None:
    """Really expire ``client``'s ZooKeeper session, server side, and wait until it has a new one.

    A second client attaches to the same session id/password and closes it; the server ends the
    session (its ephemeral nodes go), the first client is told "expired" (LOST) and reconnects
    with a fresh session (CONNECTED).
    """
    from kazoo.client import KazooClient, KazooState

    lost, back = threading.Event(), threading.Event()

    def listener(state: Any) -> bool:
        if state == KazooState.LOST:
            lost.set()
        elif state == KazooState.CONNECTED and lost.is_set():
            back.set()
            return True  # remove this listener
        return False

    client_id = wait_until(lambda: client.client_id, timeout, "the ZooKeeper client to connect")
    client.add_listener(listener)
    hosts = ",".join(f"{h}:{p}" for h, p in client.hosts)
    # The second client takes the session's connection over; if the first reconnects before
    # the close (it tries again within 0.2 s), the session is its own again and the close goes
    # nowhere: seen once under a full suite's load. Then take it over and close it again.
    deadline = time.monotonic() + timeout
    pause = max(5.0, 2 * getattr(client, "_session_timeout", 10_000) / 1000)
    while True:
        other = KazooClient(hosts=hosts, client_id=client_id, timeout=5)
        try:
            other.start(timeout=max(deadline - time.monotonic(), 1.0))
            other.stop()
        except Exception:  # (the session closed already: that is what we wait for)
            pass
        finally:
            other.close()
        if lost.wait(min(pause, max(deadline - time.monotonic(), 0.0))):
            break
        if time.monotonic() >= deadline:
            raise TimeoutError("ZooKeeper session did not expire")
    if not back.wait(timeout):
        raise TimeoutError("ZooKeeper client did not get a new session after expiry")
