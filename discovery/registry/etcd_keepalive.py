"""etcd lease renewals on one long-lived ``LeaseKeepAlive`` stream per registry.

A renewal is one message on the stream and its answer, as etcd's own clients do it, not a new
gRPC call: a call costs the host a stream set-up (and, in grpc-python, a thread to feed its
requests) and etcd a new stream, every TTL/3 on every host of the fleet. The stream is opened
on the first renewal and opened again (on the member the client uses then) after any failure:
an error from the member, the stream ending, or no answer within the client's timeout, which
also marks that member failed so that the next try goes to another. The request stream is
never half-closed while a renewal waits (etcd's gRPC proxy cancels a keepalive stream the
client half-closed before it answered).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from discovery.registry.etcd_watch import drain


class KeepAliveStream:
    """``renew(lease)``: one keepalive of ``lease`` on the open stream, its answer or an error
    in pyetcd's terms (transient ones: another member next). ``close()`` ends the stream."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()  # one renewal at a time; guards the current stream
        self._stream: Any = None
        self._requests: queue.Queue[Any] = queue.Queue()
        self._answers: queue.Queue[Any] = queue.Queue()
        self._closed = False

    def renew(self, lease: int) -> list[Any]:
        """The answer to one keepalive of ``lease`` (``[]`` if the stream ended without one)."""
        with self._lock:
            if self._closed:
                raise etcd_exc.ConnectionFailedError()
            if self._stream is None:
                self._open()
            answers = self._answers
            self._requests.put(etcdrpc.LeaseKeepAliveRequest(ID=lease))
            deadline = time.monotonic() + self._client.timeout
            while True:
                try:
                    answer = answers.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    self._drop()
                    endpoint = self._client.endpoint_in_use
                    if endpoint is not None:
                        endpoint.fail()  # as a DEADLINE_EXCEEDED call would
                    raise etcd_exc.ConnectionTimeoutError() from None
                if isinstance(answer, grpc.RpcError):
                    self._drop()
                    try:
                        raise answer
                    except grpc.RpcError as exc:
                        self._client._manage_grpc_errors(exc)  # pyetcd's translation
                        raise
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
            stream.cancel()

    def _open(self) -> None:
        client, requests, answers = self._client, queue.Queue[Any](), queue.Queue[Any]()
        stream = client.leasestub.LeaseKeepAlive(
            drain(requests), credentials=client.call_credentials, metadata=client.metadata)
        self._stream, self._requests, self._answers = stream, requests, answers
        threading.Thread(target=_read, args=(stream, answers), daemon=True,
                         name="etcd-lease-stream").start()

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._requests.put(None)
            stream.cancel()


def _read(stream: Any, answers: queue.Queue[Any]) -> None:
    """The stream's reader: every answer (then None, or the error that ended it) to
    ``answers``, which belongs to this stream alone: a late answer never reaches the next."""
    try:
        for resp in stream:
            answers.put(resp)
        answers.put(None)
    except grpc.RpcError as exc:
        answers.put(exc)
