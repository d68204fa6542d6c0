"""The etcd streams' asyncio side: one event loop thread, and gRPC asyncio channels.

A watch stream in grpc-python's threaded API costs a reader thread and a channel thread, and
each delivered event a hand-off between them: a host of its own barely feels it, a process
holding many registries does (the fleet bench: 125 simulated hosts a process). On one
asyncio loop the streams cost no thread of their own, and the events that arrive together
(one change, every host of the process) are handled in one pass of the loop
(docs/benchmarks.md, "fleet scale"). The asyncio channel is a second connection to the
member: gRPC does not share one between its threaded and its asyncio channels.

The lease's keepalive stream (:mod:`~discovery.registry.etcd_keepalive`) runs on the same
loop. A registry opened without a :class:`LoopThread` starts its own when its first stream
opens; a process that holds many registries passes one to each (``open_registry(...,
loop=...)``).
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
    """An asyncio event loop running in one daemon thread, until :meth:`close`, and its
    executor of ``workers`` threads (started as needed)."""

    def __init__(self, name: str = "etcd-loop", workers: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        # what may block runs here (a registry's state listeners, its keeper's slow rounds):
        # a loop shared by many registries needs about one worker each for a registry outage
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                               thread_name_prefix=name)
        self.loop.set_default_executor(self._executor)
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
        """Run ``coro`` on the loop; its result (or exception) on the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, coro: Coroutine[Any, Any, Any]) -> LoopTask:
        """Run ``coro`` on the loop as a task that :meth:`LoopTask.stop` ends."""
        return LoopTask(self, coro)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._executor.shutdown(wait=False)
        if not self.inside:
            self._thread.join(5)
            self.loop.close()


class LoopTask:
    """A task on a :class:`LoopThread`. ``stop()`` cancels it and waits until it has ended (its
    ``finally`` blocks done), also when it was cancelled before it ever ran."""

    def __init__(self, owner: LoopThread, coro: Coroutine[Any, Any, Any]) -> None:
        self._owner, self._ended = owner, threading.Event()
        self._task: asyncio.Task[Any] | None = None

        def create() -> None:
            self._task = owner.loop.create_task(coro)
            self._task.add_done_callback(lambda _: self._ended.set())

        owner.loop.call_soon_threadsafe(create)

    def stop(self, timeout: float) -> None:
        def cancel() -> None:  # after create(): the loop runs its callbacks in order
            if self._task is not None:
                self._task.cancel()

        if self._owner.loop.is_closed():
            return
        self._owner.loop.call_soon_threadsafe(cancel)
        if not self._owner.inside:
            self._ended.wait(timeout)


class Endpoint(pyetcd.Endpoint):
    """pyetcd's member endpoint, keeping the gRPC options its channel was made with: the
    asyncio channel of the streams to that member is made with the same ones."""

    options: list[tuple[str, Any]]

    def _mkchannel(self, opts: Any) -> Any:
        self.options = list(opts or [])
        return super()._mkchannel(opts)


class AioChannels:
    """One registry's asyncio channels, one per member, made on the loop on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def pick(self, client: Any) -> tuple[Endpoint, grpc.aio.Channel]:
        """The member a new stream goes to (pyetcd's choice: the first not recently failed)
        and its channel. A failure of the stream is that member's, whichever the client's
        other calls use by then."""
        client.channel  # noqa: B018 -- the property makes the choice
        endpoint = client.endpoint_in_use
        return endpoint, self.get(endpoint)

    def get(self, endpoint: Endpoint) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint.netloc)
        if channel is None:
            options = endpoint.options
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


async def write(call: Any, request: Any) -> bool:
    """``call.write(request)``: False if the call has ended without an error, its error if it
    ended with one (grpc.aio raises ``InvalidStateError`` for a write to an ended call; the
    stream's error, say UNAVAILABLE from a member that died, is what the caller handles)."""
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return False
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   await call.details()) from None
    return True
