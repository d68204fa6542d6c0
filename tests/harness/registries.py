"""Fixtures over the session's servers (tests/harness/servers.py): a fresh etcd prefix, the
running ZooKeeper, and registries closed at a test's end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from discovery.registry import Registry
from tests.harness.servers import ServerCluster, unique_prefix


@pytest.fixture
def zk(zk_single: ServerCluster) -> ServerCluster:
    """The session's single ZooKeeper, running (started again if a test stopped it)."""
    zk_single.ensure_running()
    return zk_single


@pytest.fixture
def regs() -> Iterator[list[Registry]]:
    """Registries a test opens: each closed at its end, whatever happened."""
    opened: list[Registry] = []
    yield opened
    for reg in opened:
        with contextlib.suppress(Exception):
            reg.close()


@pytest.fixture
def etcd_url(etcd_single: ServerCluster) -> str:
    """A fresh prefix on the session's single etcd (started again if a test stopped it)."""
    etcd_single.ensure_running()
    return etcd_single.url(unique_prefix())
