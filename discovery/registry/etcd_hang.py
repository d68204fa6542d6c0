"""A watch stream on an etcd member that hangs, told from one that is only slow.

A member that hangs (its process paused: SIGSTOP, a VM frozen or starved of CPU) keeps its
connections open and answers nothing, its watch streams included, and nothing ends them:
measured in ``bench/faults.py`` (``member-stall``), a watcher's catalog stood still for the 40 s
a member was paused, gRPC's keepalive (10 s, then 5 s) did not end the stream. A call or a
lease renewal of the same registry to that member gets no answer within its timeout
(:meth:`~discovery.registry.etcd_aio.Endpoint.hung`); a watch stream on it is then asked for
its progress (etcd 3.4's ``WatchProgressRequest``, answered by the member itself at once).
Anything the stream delivers within ``PROBE`` s says the member is alive and only a call was
slow (a large read, an election): the stream stays. Nothing: the stream is left for another
member, from the revision delivered (nothing missed). No other member to go to (one
endpoint: etcd's gRPC proxy, which answers no progress request): nothing is asked. Behind two
or more proxies, a call that merely ran late moves the stream to the next proxy (a new
stream, resumed: nothing missed). While the stream awaits the answer to a watcher it asked
etcd to create, that answer is the sign of life, and nothing more is written (one write at a
time on a gRPC stream: a second fails the stream).

Not told: a member whose process runs but whose applying stalls (its disk hangs) answers the
progress request from what it has applied, so its stream stays, silent, until it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from pyetcd import etcdrpc

from discovery.registry import etcd_aio

log = logging.getLogger(__name__)

PROBE = 0.5  # seconds a suspected stream has to deliver anything
PROGRESS = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())


class HangProbe:
    """One watch's: while a stream is open on a member (:meth:`follow`), that member's hang
    (a call of ``client``'s to it that got no answer) has the stream asked; :meth:`heard`
    whenever it delivers; ``leave(stream)`` on the loop of ``loop()`` if it stays silent."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop], client: Any,
                 leave: Callable[[Any], None]) -> None:
        self._loop, self._client, self._leave = loop, client, leave
        self._asked: Any = None  # the stream asked, until it answers or PROBE s pass
        self._timer: asyncio.TimerHandle | None = None
        self._stream: Any = None  # the stream followed now
        self._awaits: Callable[[], bool] = bool  # whether it awaits an answer already

    def follow(self, endpoint: etcd_aio.Endpoint, stream: Any,
               awaits: Callable[[], bool]) -> Callable[[], None]:
        """Listen for ``endpoint`` hanging while ``stream`` is open on it (``awaits()``:
        whether it awaits a create's answer); returns the call that stops (when it ends)."""
        hangs = functools.partial(self._hangs, stream, endpoint)
        self._stream, self._awaits = stream, awaits
        endpoint.on_hang(hangs)

        def done() -> None:
            endpoint.on_hang(hangs, listen=False)
            if self._stream is stream:
                self._stream = None
                self.heard()
        return done

    def _hangs(self, stream: Any, endpoint: etcd_aio.Endpoint) -> None:
        with contextlib.suppress(RuntimeError):  # the registry closed its loop meanwhile
            self._loop().call_soon_threadsafe(self._suspect, stream, endpoint)

    def _suspect(self, stream: Any, endpoint: etcd_aio.Endpoint) -> None:
        """(On the loop.) Asked, unless it is asked already or no other member is up (one
        endpoint: a proxy)."""
        if (stream is not self._stream or self._asked is stream
                or not any(e is not endpoint and not e.is_failed()
                           for e in self._client.endpoints.values())):
            return
        self.heard()
        self._asked = stream
        if not self._awaits():
            asking = asyncio.ensure_future(etcd_aio.write(stream, PROGRESS))
            asking.add_done_callback(lambda t: t.cancelled() or t.exception())  # read says why
        self._timer = asyncio.get_running_loop().call_later(PROBE, self._silent, stream)

    def heard(self) -> None:
        """The stream delivered something (an answer, an event, a progress notification)."""
        self._asked = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _silent(self, stream: Any) -> None:
        self._timer = None
        if self._asked is stream and stream is self._stream:
            self._asked = None
            self._leave(stream)
