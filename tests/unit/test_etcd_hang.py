"""A watch stream on a member that hangs (registry/etcd_hang.py): asked for its progress
when a call to its member got no answer; left only if it stays silent, and only if another
member is up to go to."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from discovery.registry import etcd_aio, etcd_hang
from discovery.registry.etcd_hang import HangProbe


class Stream:
    """A watch call: what was written to it."""

    def __init__(self) -> None:
        self.written: list[Any] = []

    async def write(self, request: Any) -> None:
        self.written.append(request)


def endpoint(port: int) -> etcd_aio.Endpoint:
    return etcd_aio.endpoints([("127.0.0.1", port)], False, None)[0]


class Client:
    def __init__(self, *eps: etcd_aio.Endpoint) -> None:
        self.endpoints = {e.netloc: e for e in eps}


async def past_probe() -> None:
    """Until after the probe's timer: the loop runs its timers in the order they fall due, so
    one set PROBE s from now has run when this sleep ends (no race: one thread, one clock)."""
    await asyncio.sleep(etcd_hang.PROBE + 0.01)


async def probed(answers: bool, others_up: bool = True, creating: bool = False
                 ) -> tuple[list[Any], Stream]:
    """A stream on member a; a call to a got no answer (a.hung()); the stream answers the
    progress request (or, ``creating``, the create it awaits) or not. Returns the streams
    left, and the stream."""
    a, b = endpoint(1), endpoint(2)
    if not others_up:
        b.fail()
    left: list[Any] = []
    loop = asyncio.get_running_loop()
    probe = HangProbe(lambda: loop, Client(a, b), left.append)
    stream = Stream()
    done = probe.follow(a, stream, lambda: creating)
    a.hung()  # from this thread: as from a call's
    await asyncio.sleep(0)  # one turn: hung()'s word, queued first, runs
    if answers:
        probe.heard()  # the progress notification
    await past_probe()
    done()
    return left, stream


def test_a_silent_stream_is_left() -> None:
    left, stream = asyncio.run(probed(answers=False))
    assert left == [stream] and stream.written == [etcd_hang.PROGRESS]


def test_a_stream_that_answers_stays_though_a_call_timed_out() -> None:
    left, stream = asyncio.run(probed(answers=True))
    assert left == [] and stream.written == [etcd_hang.PROGRESS]


@pytest.mark.parametrize("answers", [True, False])
def test_a_stream_awaiting_a_create_is_not_written_to(answers: bool) -> None:
    """The create's answer is the sign of life (a second write at once fails a gRPC stream)."""
    left, stream = asyncio.run(probed(answers=answers, creating=True))
    assert stream.written == [] and left == ([] if answers else [stream])


def test_a_late_word_of_an_ended_stream_leaves_the_next_one_asked() -> None:
    """Stream A on member a ends, B opens on b; b hangs, then a's hang (a call that timed
    out there) is told late: B is still asked, and left (A's word cancelled B's probe)."""
    async def run() -> tuple[list[Any], Stream, Stream]:
        a, b, c = endpoint(1), endpoint(2), endpoint(3)
        left: list[Any] = []
        loop = asyncio.get_running_loop()
        probe = HangProbe(lambda: loop, Client(a, b, c), left.append)
        first, second = Stream(), Stream()
        probe.follow(a, first, bool)()  # A followed, then ended
        probe.follow(b, second, bool)
        b.hung()
        await asyncio.sleep(0)  # one turn: hung()'s word, queued first, runs
        probe._suspect(first, a)  # A's member's hang, told late
        await past_probe()
        return left, first, second

    left, first, second = asyncio.run(run())
    assert left == [second] and first.written == []


def test_with_no_other_member_up_nothing_is_asked() -> None:
    """One endpoint (etcd's gRPC proxy), or every other one failed: nowhere to go."""
    left, stream = asyncio.run(probed(answers=False, others_up=False))
    assert left == [] and stream.written == []


@pytest.mark.parametrize("twice", [True, False])
def test_a_stream_no_longer_followed_is_not_asked(twice: bool) -> None:
    async def run() -> tuple[list[Any], Stream]:
        a, b = endpoint(1), endpoint(2)
        left: list[Any] = []
        loop = asyncio.get_running_loop()
        probe = HangProbe(lambda: loop, Client(a, b), left.append)
        stream = Stream()
        done = probe.follow(a, stream, bool)
        if twice:
            a.hung()
            a.hung()  # asked once
            await asyncio.sleep(0)  # one turn: hung()'s word, queued first, runs
        done()  # the stream ended: its member's hang is no longer its concern
        a.hung()
        await past_probe()
        return left, stream

    left, stream = asyncio.run(run())
    assert left == [] and stream.written == ([etcd_hang.PROGRESS] if twice else [])


def test_a_call_that_times_out_tells_its_own_member() -> None:
    """Not the member the client uses by the time the answer is late (another call's
    timeout may have moved it): that one's streams are healthy. The error comes without the
    call's frames: a caller that keeps it kept the call's channel, closed after a failover,
    and its connection, until a full collection."""
    import grpc

    class Channels:
        def stub(self, _cls: type, _endpoint: etcd_aio.Endpoint) -> Any:
            class Stub:
                async def Range(self, _request: Any, timeout: float | None = None) -> Any:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               grpc.aio.Metadata(), grpc.aio.Metadata())
            return Stub()

    a = endpoint(1)
    told: list[str] = []
    a.on_hang(lambda: told.append(a.netloc))
    loop = etcd_aio.LoopThread()
    try:
        stub = etcd_aio.LoopStub(object, a, Channels(), lambda: loop,  # type: ignore[arg-type]
                                 lambda: None)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Range(None, 1.0)
    finally:
        loop.close()
    assert told == [a.netloc] and a.is_failed()
    # raised bare: no traceback through the call's frames (which hold its channel)
    frames, tb = [], raised.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "call" not in frames and raised.value.__context__ is None, frames
