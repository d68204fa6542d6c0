"""Fixtures over the session's servers (tests/harness/servers.py): a fresh etcd prefix, the
running ZooKeeper, a raw ZooKeeper client of another identity, and registries closed at a
test's end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.security import make_digest_acl

from discovery.registry import Registry, open_registry
from tests.harness.servers import ServerCluster, unique_prefix


@pytest.fixture
def zk(zk_single: ServerCluster) -> ServerCluster:
    """The session's single ZooKeeper, running (started again if a test stopped it)."""
    zk_single.ensure_running()
    return zk_single


#: another ZooKeeper identity: what it creates with ``LOCKED``, a test's registry may not read
OTHER = ("other", "pw")
LOCKED = [make_digest_acl(*OTHER, all=True)]


@pytest.fixture
def other(zk: ServerCluster) -> Iterator[KazooClient]:
    """A raw ZooKeeper client of the ``OTHER`` identity."""
    host, port = zk.address(0)
    client = KazooClient(hosts=f"{host}:{port}", auth_data=[("digest", ":".join(OTHER))])
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def regs() -> Iterator[list[Registry]]:
    """Registries a test opens: each closed at its end, whatever happened."""
    opened: list[Registry] = []
    yield opened
    for reg in opened:
        with contextlib.suppress(Exception):
            reg.close()


@pytest.fixture
def open_reg() -> Iterator[Callable[..., Registry]]:
    """Opens registries (``open_registry(url, **kw)``, no environment read); each is closed
    without revoking its lease when the test ends. Modules that need other defaults have their
    own ``open_reg``."""
    with contextlib.ExitStack() as stack:
        def make(url: str, **kw: Any) -> Registry:
            reg = open_registry(url, **{"environ": {}, **kw})
            stack.callback(reg.close, revoke=False)
            return reg

        yield make


@pytest.fixture
def etcd_url(etcd_single: ServerCluster) -> str:
    """A fresh prefix on the session's single etcd (started again if a test stopped it)."""
    etcd_single.ensure_running()
    return etcd_single.url(unique_prefix())


def no_write_back(reg: Registry) -> None:
    """Stop ``reg`` watching its own keys (discovery/registry/owned.py, zk_own, etcd_own), so
    that it no longer writes back, at random within ``spread=``, an entry of its own another
    writer deleted or changed: for a test of something else that does so by hand (else it
    passes or fails by that random delay). ``reg`` must follow no service with a watch."""
    reg._restorer.own.close()  # type: ignore[attr-defined]
