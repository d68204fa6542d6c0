"""A watch stream that ends with neither an error nor our own cancel (a proxy or balancer in
front of etcd may end one so; etcd and its grpc-proxy answer UNAVAILABLE) is a lost link,
waited for as any other: it was taken for a clean end and opened again at once, every time,
a loop of streams from every host as fast as the server ended them."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from discovery.registry import etcd_watch
from discovery.registry.etcd_aio import LoopThread
from discovery.registry.url import RegistryURL
from tests.harness.servers import wait_until


class EndingStream:
    """Answers the create, then ends (EOF); ``opened`` counts the streams."""

    opened: list[float] = []  # when each was opened (monotonic)

    def __init__(self) -> None:
        self.opened.append(time.monotonic())
        self.answers: list[Any] = []

    async def write(self, request: Any) -> None:
        self.answers.append(SimpleNamespace(
            compact_revision=0, created=True, canceled=False, watch_id=1, events=[],
            header=SimpleNamespace(revision=5)))

    async def read(self) -> Any:
        await asyncio.sleep(0)
        return self.answers.pop(0) if self.answers else grpc.aio.EOF

    def cancel(self) -> None:
        pass


class Endpoint:
    def on_hang(self, fn: Any, listen: bool = True) -> None:
        pass

    def fail(self) -> None:
        pass


class Source:
    """The registry as the watch sees it; ``states`` what it was told of its link."""

    def __init__(self) -> None:
        self.url = RegistryURL.parse("etcd://127.0.0.1:2379/discovery")
        self.where = "127.0.0.1:2379"
        self.auth = SimpleNamespace(ensure=lambda: None, metadata=lambda: (), enabled=False,
                                    stale=lambda exc: False, drop=lambda: None)
        self.client = SimpleNamespace(follow=lambda endpoint: None, endpoints={})
        self.channels = SimpleNamespace(pick=lambda client: (Endpoint(), None),
                                        prune=self._prune)
        self.loop = LoopThread("test-etcd-loop")
        self.states: list[bool] = []
        self.told = threading.Event()

    async def _prune(self, members: object) -> None:
        pass

    def revision(self) -> int:
        return 5

    def set_state(self, up: bool) -> None:
        self.states.append(up)
        self.told.set()

    def members_in_use(self) -> set[str]:
        return set()


def test_a_stream_the_server_ends_is_a_lost_link_and_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_watch.etcdrpc, "WatchStub",
                        lambda channel: SimpleNamespace(Watch=lambda metadata: EndingStream()))
    opened = EndingStream.opened = []
    source = Source()
    watch = etcd_watch.EtcdWatch(source, lambda change: None, 4, spread=0.6)  # type: ignore[arg-type]
    try:
        wait_until(lambda: False in source.states, 5, "the link reported lost")
        wait_until(lambda: len(opened) >= 4, 10, "the stream opened again, twice")
        # each held its watchers for less than HELD_BRIEFLY: no first loss (another member
        # at once) but the backoff's wait, at least half a spread (0.3 s), every time
        assert all(b - a >= 0.3 for a, b in itertools.pairwise(opened)), opened
    finally:
        watch.stop()
        source.loop.close()
