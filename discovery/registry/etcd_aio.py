"""The etcd streams' asyncio side: one event loop thread, and gRPC asyncio channels.

A watch stream in grpc-python's threaded API costs a reader thread and a channel thread, and
each delivered event a hand-off between them: a host of its own barely feels it, a process
holding many registries does (the fleet bench: 125 simulated hosts a process). On one
asyncio loop the streams cost no thread of their own, and the events that arrive together
(one change, every host of the process) are handled in one pass of the loop
(docs/benchmarks.md, "fleet scale"). gRPC shares no connection between its threaded and
its asyncio channels, so the registry's calls go the same way (:class:`Client`): one
connection to a member for the streams and the calls, not two.

The lease's keepalive stream (:mod:`~discovery.registry.etcd_keepalive`) runs on the same
loop. A registry opened without a :class:`LoopThread` starts its own at its first call or
stream; a process that holds many registries passes one to each (``open_registry(...,
loop=...)``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from discovery.registry.etcd_read import MAX_RECEIVE_BYTES

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which another endpoint (or a later try) may well succeed.
TRANSIENT = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.InternalServerError,
)

#: every registry channel's gRPC options (a process's channels of equal target and options
#: share their connections)
GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),  # see etcd_read
    # A channel with no call or stream for a minute lets its connection go (gRPC's default
    # is 30 min): after a failover the calls and the streams may have moved to another
    # member, and the channel to the one they left kept a connection open for nothing (the
    # fleet bench: 1.5 connections a host after a full restart). The next call reconnects.
    ("grpc.client_idle_timeout_ms", 60_000),
]
ENDPOINT_RETRY = 1.0  # seconds a failed endpoint is skipped before it is tried again


def timed_out_in_server(code: Any, details: Any) -> bool:
    """etcd's answer to a write whose proposal timed out inside the member (during an
    election, a member that lost its leader): ``UNKNOWN: context deadline exceeded``. Every
    request here may be sent again (puts and deletes of fixed values, reads, keepalives,
    revokes; a lease grant sent twice leaves one unused lease that expires after its TTL)."""
    return code == grpc.StatusCode.UNKNOWN and "deadline exceeded" in str(details)


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
    asyncio channel of the streams to that member is made with the same ones; and the
    streams on it to end when it hangs (:meth:`hung`)."""

    options: list[tuple[str, Any]]

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._hang_lock = threading.Lock()
        self._on_hang: set[Callable[[], None]] = set()
        super().__init__(*args, **kw)

    def _mkchannel(self, opts: Any) -> Any:
        self.options = list(opts or [])
        return super()._mkchannel(opts)

    def on_hang(self, callback: Callable[[], None], listen: bool = True) -> None:
        """Call ``callback`` (from any thread) when this member hangs (``listen`` False: no
        more). A watch stream on it listens while it is open."""
        with self._hang_lock:
            (self._on_hang.add if listen else self._on_hang.discard)(callback)

    def hung(self) -> None:
        """A call or a renewal got no answer within its timeout: another member next (as
        pyetcd does), and the streams on this one are told. A member that hangs (a paused
        process, a stalled disk) keeps its streams open and silent: measured, a watch stream
        on a SIGSTOPped etcd delivered nothing for 40 s, gRPC's keepalive did not end it."""
        self.fail()
        with self._hang_lock:
            callbacks = list(self._on_hang)
        for callback in callbacks:
            callback()


def endpoints(hosts: Collection[tuple[str, int]], secure: bool, creds: Any) -> list[Endpoint]:
    """pyetcd's endpoints of the members ``hosts``, with :data:`GRPC_OPTIONS`."""
    return [Endpoint(f"[{h}]" if ":" in h else h, p, secure=secure, creds=creds,
                     time_retry=ENDPOINT_RETRY, opts=GRPC_OPTIONS) for h, p in hosts]


def chosen(client: Any) -> Endpoint:
    """The member pyetcd's ``client`` uses now: the first not recently failed."""
    client.channel  # noqa: B018 -- the property makes the choice
    return client.endpoint_in_use


class AioChannels:
    """One registry's asyncio channels, one per member, made on the loop on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[type, str], Any] = {}  # (stub class, member): on the loop

    def pick(self, client: Any) -> tuple[Endpoint, grpc.aio.Channel]:
        """The member a new stream goes to (:func:`chosen`) and its channel. A failure of the
        stream is that member's, whichever the client's other calls use by then."""
        endpoint = chosen(client)
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

    def stub(self, stub_class: type, endpoint: Endpoint) -> Any:
        """``stub_class`` on ``endpoint``'s channel (on the loop)."""
        stub = self._stubs.get((stub_class, endpoint.netloc))
        if stub is None:
            stub = self._stubs[stub_class, endpoint.netloc] = stub_class(self.get(endpoint))
        return stub

    async def prune(self, keep: Collection[str]) -> None:
        """Close the channels to members (netlocs) not in ``keep``, those the calls and the
        streams use now. A channel that a failover tried on its way, and that connected
        again by itself once its member was back, keeps its connection for good: gRPC's idle
        timeout starts only when a call ends (measured: every host of a full restart then
        held a connection to each of the 3 members). The next use opens it again."""
        for netloc in [n for n in self._channels if n not in keep]:
            channel = self._channels.pop(netloc)
            self._stubs = {k: v for k, v in self._stubs.items() if k[1] != netloc}
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._stubs = {}
        for channel in channels:
            await channel.close()

    def close_on(self, loop: LoopThread | None, timeout: float, own_loop: bool) -> None:
        """Close the channels on ``loop`` (waiting at most ``timeout`` s; not from inside it),
        then ``loop`` itself if it is the registry's own."""
        if loop is None:
            return
        if not loop.inside:
            with contextlib.suppress(Exception):
                loop.submit(self.close()).result(timeout)
        if own_loop:
            loop.close()


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


class LoopStub:
    """A stub of pyetcd's calling convention (``stub.Range(request, timeout, metadata=...)``)
    whose calls run as grpc.aio calls on the loop, over the member's asyncio channel; the
    caller's thread waits for the answer. Called on the loop's own thread (which must never
    wait for the loop), it uses the threaded channel instead: a second connection, opened
    only then."""

    def __init__(self, stub_class: type, endpoint: Endpoint, channels: AioChannels,
                 loop: Callable[[], LoopThread], threaded: Callable[[], Any]) -> None:
        self._class, self._endpoint, self._channels = stub_class, endpoint, channels
        self._loop, self._threaded = loop, threaded

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return functools.partial(self._call, method)

    def _call(self, method: str, request: Any, timeout: float | None = None,
              **kw: Any) -> Any:
        loop = self._loop()
        if loop.inside:
            return getattr(self._threaded(), method)(request, timeout, **kw)

        async def call() -> Any:
            return await getattr(self._channels.stub(self._class, self._endpoint), method)(
                request, timeout=timeout, **kw)

        try:  # the call's own deadline ends it; the margin is for a loop that is stuck
            return loop.submit(call()).result(None if timeout is None else timeout + 1)
        except concurrent.futures.TimeoutError:
            raise etcd_exc.ConnectionTimeoutError() from None
        except concurrent.futures.CancelledError:  # its channel closed meanwhile (pruned)
            raise etcd_exc.ConnectionFailedError() from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._endpoint.hung()  # this call's member, whichever the client uses now
            failure = _bare(exc)
        raise failure  # (outside the handler: no context that holds the call's frames)


def _bare(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """``exc`` without its traceback: the frames it holds hold the call and its channel, and a
    caller that keeps the error (a cycle through its own frame: ``failure = exc``) kept a
    channel closed since (after a failover) and its connection until a full collection."""
    return grpc.aio.AioRpcError(exc.code(), exc.initial_metadata(), exc.trailing_metadata(),
                                exc.details(), exc.debug_error_string())


def _loop_stub(name: str, stub_class: type) -> Any:
    """The property of :class:`Client` that makes (once a member) its :class:`LoopStub`."""

    def get(self: Client) -> LoopStub:
        self.go_home()
        stub = self._stubs.get(name)
        if stub is None:
            endpoint = chosen(self)
            threaded = functools.partial(stub_class, endpoint.channel)
            stub = self._stubs[name] = LoopStub(stub_class, endpoint, self.aio_channels,
                                                self._loop_of, threaded)
        return stub

    return property(get)


class Client(pyetcd.MultiEndpointEtcd3Client):
    """pyetcd's client whose calls go over the registry's asyncio channels (:class:`LoopStub`).
    pyetcd still chooses the member (the first not recently failed) and drops its stubs when
    that member fails, so the next call picks again.

    The calls go back to the member the registry's watch stream is on (:meth:`follow`) once
    it is no longer marked failed: a call that timed out on a member whose watch stream lived
    on (a member paused, a full restart's members coming back one by one) left the calls and
    the keepalive stream, which follows the calls, on another member for good. That was two
    connections a host instead of one (1,244 at 1,000 hosts in the fleet bench after two
    full restarts)."""

    def __init__(self, *args: Any, channels: AioChannels, loop: Callable[[], LoopThread],
                 **kw: Any) -> None:
        self.aio_channels, self._loop_of = channels, loop
        self._home: Endpoint | None = None
        super().__init__(*args, **kw)

    def follow(self, endpoint: Endpoint) -> None:
        """A watch stream of the registry is established on ``endpoint``: the calls go
        there too, now and whenever it is not marked failed."""
        self._home = endpoint
        self.go_home()

    def go_home(self) -> None:
        """To the member of :meth:`follow` if the calls are elsewhere and it has not failed
        (pyetcd drops its stubs of the member left)."""
        home = self._home
        if (home is not None and home is not self.endpoint_in_use and not home.is_failed()
                and self.endpoints.get(home.netloc) is home):
            self._current_endpoint_label = home.netloc

    authstub = _loop_stub("authstub", etcdrpc.AuthStub)
    kvstub = _loop_stub("kvstub", etcdrpc.KVStub)
    clusterstub = _loop_stub("clusterstub", etcdrpc.ClusterStub)
    leasestub = _loop_stub("leasestub", etcdrpc.LeaseStub)
    maintenancestub = _loop_stub("maintenancestub", etcdrpc.MaintenanceStub)

    def txn_response(self, request: etcdrpc.TxnRequest) -> Any:
        """One ``Txn`` built by the caller, its errors handled as pyetcd handles its own
        (pyetcd's ``transaction`` cannot limit, pin to a revision or count a range)."""
        try:
            return self.kvstub.Txn(request, self.timeout, credentials=self.call_credentials,
                                   metadata=self.metadata)
        except grpc.RpcError as exc:
            self._manage_grpc_errors(exc)
            raise  # not reached: pyetcd raises its own error or this one
