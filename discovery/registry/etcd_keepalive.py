"""etcd lease renewals on one long-lived ``LeaseKeepAlive`` stream per registry.

A renewal is one message on the stream and its answer, as etcd's own clients do it, not a new
gRPC call: a call costs the host a stream set-up (and, in grpc-python, a thread to feed its
requests) and etcd a new stream, every TTL/3 on every host of the fleet. The stream is opened
on the first renewal and opened again (on the member the client uses then) after any failure:
an error from the member, the stream ending, or no answer within the client's timeout. A
member that failed so is marked failed, so that the next try goes to another: the stream's
own member, which need not be the one the client's other calls use by then. The request
stream is never half-closed while a renewal waits (etcd's gRPC proxy cancels a keepalive
stream the client half-closed before it answered).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from discovery.registry.etcd_watch import ENDPOINT_DOWN


class _Stream:
    """One open ``LeaseKeepAlive`` call: its request queue and its own answer queue, filled by
    a reader thread (every answer, then None or the error that ended it), so that a late answer
    of this stream never reaches the next one."""

    def __init__(self, client: Any) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.answers: queue.Queue[Any] = queue.Queue()
        channel = client.channel  # the first member not recently failed
        self.endpoint = client.endpoint_in_use  # the member this stream is on, whatever the
        # client uses later: a failure here is this member's, never the one in use then
        self.call = etcdrpc.LeaseStub(channel).LeaseKeepAlive(
            drain(self.requests), credentials=client.call_credentials, metadata=client.metadata)
        threading.Thread(target=self._read, daemon=True, name="etcd-lease-stream").start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.answers.put(resp)
            self.answers.put(None)
        except grpc.RpcError as exc:
            self.answers.put(exc)

    def end(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class KeepAliveStream:
    """``renew(lease)``: one keepalive of ``lease`` on the open stream, its answer or an error
    in pyetcd's terms (transient ones: another member next). ``close()`` ends the stream."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()  # one renewal at a time; guards the current stream
        self._stream: _Stream | None = None
        self._closed = False

    def renew(self, lease: int) -> list[Any]:
        """The answer to one keepalive of ``lease`` (``[]`` if the stream ended without one)."""
        with self._lock:
            if self._closed:
                raise etcd_exc.ConnectionFailedError()
            stream = self._stream = self._stream or _Stream(self._client)
            stream.requests.put(etcdrpc.LeaseKeepAliveRequest(ID=lease))
            deadline = time.monotonic() + self._client.timeout
            while True:
                try:
                    answer = stream.answers.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    self._drop()
                    stream.endpoint.fail()  # as a DEADLINE_EXCEEDED call would
                    raise etcd_exc.ConnectionTimeoutError() from None
                if isinstance(answer, grpc.RpcError):
                    self._drop()
                    if answer.code() in ENDPOINT_DOWN:  # this member: another one next
                        stream.endpoint.fail()
                        raise etcd_exc.ConnectionFailedError() from answer
                    raise answer  # the registry's own handling (lease gone, token expired)
                if answer is None:  # the stream ended without an error
                    self._drop()
                    return []
                if lease == answer.ID:
                    return [answer]
                # an answer for another lease (one we renewed before a new grant): not ours

    def close(self) -> None:
        """End the stream; a renewal waiting on it fails at once (no lock: it holds it)."""
        self._closed = True
        stream = self._stream
        if stream is not None:
            stream.end()

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.end()


def drain(requests: queue.Queue[Any]) -> Iterator[Any]:
    """A gRPC request stream fed from ``requests``; ``None`` ends it."""
    while (item := requests.get()) is not None:
        yield item
