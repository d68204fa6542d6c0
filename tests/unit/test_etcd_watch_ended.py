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
    """Answers the first create, then ends (EOF; a write to it after: ``InvalidStateError``,
    its code OK, as grpc.aio's); ``opened`` records the streams."""

    opened: list[float] = []  # when each was opened (monotonic)

    def __init__(self) -> None:
        self.opened.append(time.monotonic())
        self.answers: list[Any] = []
        self.writes = 0

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    async def write(self, request: Any) -> None:
        self.writes += 1
        if self.writes > 1:
            raise asyncio.InvalidStateError
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


@pytest.mark.parametrize("services", [None, ["api", "web"]])
def test_a_stream_the_server_ends_is_a_lost_link_and_waits(
        monkeypatch: pytest.MonkeyPatch, services: list[str] | None) -> None:
    """The whole prefix: the read after the create ends (the stream held, briefly: the
    backoff from the first); two services: the write of the second create finds the call
    ended (that path went on at once too, every time)."""
    monkeypatch.setattr(etcd_watch.etcdrpc, "WatchStub",
                        lambda channel: SimpleNamespace(Watch=lambda metadata: EndingStream()))
    opened = EndingStream.opened = []
    source = Source()
    watch = etcd_watch.EtcdWatch(source, lambda change: None, 4, services,  # type: ignore[arg-type]
                                 spread=0.6)
    try:
        wait_until(lambda: len(opened) >= 4, 10, "the stream opened again, three times")
        # the registry is not reported down for it (a balancer ending streams on a timer
        # flapped every host's health and had its agent read the registry)
        assert False not in source.states
        # a lost link, resumed (polled: each new stream holds its watchers for a moment)
        wait_until(lambda: watch.resuming, 5, "the watch resuming")
        # the first loss of one that never held its watchers: another member after 0.1 s; one
        # that held them under HELD_BRIEFLY, and every next loss: the backoff's wait, at least
        # half a spread (0.3 s)
        assert opened[1] - opened[0] >= 0.1, opened
        assert all(b - a >= 0.3 for a, b in itertools.pairwise(opened[1:])), opened
    finally:
        watch.stop()
        source.loop.close()
