"""The etcd watch streams' asyncio side: one event loop thread, and gRPC asyncio channels.

A watch stream in grpc-python's threaded API costs a reader thread and a channel thread, and
each delivered event a hand-off between them: a host of its own barely feels it, a process
holding many registries does (the fleet bench: 125 simulated hosts a process). On one
asyncio loop the streams cost no thread of their own, and the events that arrive together
(one change, every host of the process) are handled in one pass of the loop
(docs/benchmarks.md, "fleet scale"). The asyncio channel is a second connection to the
member: gRPC does not share one between its threaded and its asyncio channels.

A registry opened without a :class:`LoopThread` starts its own on its first watch; a process
that holds many registries passes one to each (``open_registry(..., loop=...)``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pyetcd

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in one daemon thread, until :meth:`close`."""

    def __init__(self, name: str = "etcd-watch-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def inside(self) -> bool:
        """True in the loop's own thread (which must never wait for the loop)."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.inside:
            self._thread.join(5)
            self.loop.close()


class Endpoint(pyetcd.Endpoint):
    """pyetcd's member endpoint, keeping the gRPC options its channel was made with: the
    watch's asyncio channel to that member is made with the same ones."""

    options: list[tuple[str, Any]]

    def _mkchannel(self, opts: Any) -> Any:
        self.options = list(opts or [])
        return super()._mkchannel(opts)


class AioChannels:
    """One registry's asyncio channels, one per member, made on the loop on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: Any) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint.netloc)
        if channel is None:
            options = getattr(endpoint, "options", None)
            channel = (grpc.aio.secure_channel(endpoint.netloc, endpoint.credentials,
                                               options=options)
                       if endpoint.secure else
                       grpc.aio.insecure_channel(endpoint.netloc, options=options))
            self._channels[endpoint.netloc] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
