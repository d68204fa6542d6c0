"""etcd lease renewals on one long-lived ``LeaseKeepAlive`` stream per registry.

A renewal is one message on the stream and its answer, as etcd's own clients do it, not a new
gRPC call: a call costs the host a stream set-up and etcd a new stream, every TTL/3 on every
host of the fleet. The stream runs on the registry's asyncio loop, beside its watch streams
(:mod:`~discovery.registry.etcd_aio`), and so does the registry's keeper, which renews on it
(``renew_async``); a round that needs more (retries over the members, a new lease) runs in
the loop's executor and renews with ``renew``. The stream is opened on the first
renewal and opened again (on the member the client uses then) after any failure: an error
from the member, the stream ending, or no answer within the client's timeout. A member that
failed so is marked failed, so that the next try goes to another: the stream's own member,
which need not be the one the client's other calls use by then. A stream on another member
than the calls' (which go back to the watch stream's: ``etcd_aio.Client.follow``) is opened
again on theirs at its next renewal: one connection a host. The request stream is never
half-closed while a renewal waits (etcd's gRPC proxy cancels a keepalive stream the client
half-closed before it answered).

How long a renewal waits for its answer depends on who answers. A member answers at once,
so no answer within the client's timeout means a member that hangs: another one next. etcd's
gRPC proxy renews each lease itself, every TTL/3 on a 0.5 s tick, and answers a renewal only
at its own next one (measured on etcd 3.4: 2.6 s after the request, straight to etcd 1 ms): a
renewal sent just after the proxy's waited more than the client's timeout, and every host
behind a proxy reported a healthy etcd unreachable now and then (5 hosts at TTL 10 s: 12
times a minute). So once a member's answers have come late (over ``LATE`` s), renewals wait
for its answers up to a renewal interval + 1 s (``late_wait``). A member not known to be late
whose answer has not come half-way through the client's timeout is asked for its status
(``PROBE`` s at most, as a member with a leader): one that answers that at once but not the
renewal defers renewals, so it is late, and the renewal waits on for its answer; one that
answers neither (it hangs, or has no leader) is left at the client's timeout, as before the
probe. Without it, the first late answer of every new stream to a proxy (new host, new
member) could come after the client's timeout (at TTL 3 s: 9 hosts of 96 reported etcd
unreachable in their first 9 s), and a host behind a proxy has no other member to fail over
to. A member that has answered ``PROMPT`` renewals within ``FAST`` s (none later than
``LATE``) is a member, not a proxy, and is not probed: after a full restart of the cluster,
the busy members would otherwise be asked for their status by every host whose renewal they
had not answered yet, in the second the fleet's requests peak (168 calls in that second of
one run at 1,000 hosts). Measured on etcd 3.4 at TTL 10 s (``bench/proxy_renewals.py``): a
member answers in 1 ms (144 of 144 within ``FAST``); a proxy's answers spread evenly over its
0.5 s tick, 42 of 720 within ``FAST`` and 470 over ``LATE`` (the first of a lease may come at
once), so one passes for a member with odds of (42 / 512)^11, about 10^-12; if it then leaves
a renewal unanswered past the client's timeout, the stream fails, the count starts again, and
the next slow renewal is probed.

When the keeper tries again after a failed round (:class:`KeeperWaits`) depends on why it
failed. No member answered (:class:`~discovery.errors.RegistryUnavailable`, the link or the
registry down): :func:`retry_wait`, short, so the fleet is back soon after its registry. etcd
answered no (any other :class:`~discovery.errors.RegistryError`: a new lease or the rewrite of
the instances refused, etcd out of space with its NOSPACE alarm, a role without write
permission): that is tried again after ``GONE_RETRY`` s, the wait doubling (±25 %, so a fleet
refused at one moment drifts apart, each wait still longer than the last) to
``REFUSED_MAX`` s while it is refused, each refusal a warning; a lease held meanwhile is renewed
every renewal interval as in steady state. Before, a refusal was tried again every
``GONE_RETRY`` s forever (measured: 14 refused grants in 10 s; a refused rewrite, 1.1 rewrites
and 1.1 renewals a second), on every host of the fleet. Once a round works the wait starts
again from ``GONE_RETRY``; when the registry comes back after an outage (a call of the
registry's succeeds again) or another call of the registry's is granted a lease, the keeper
tries again within about ``GONE_RETRY`` s (±50 %), as after an outage it saw itself, its wait
kept for a next refusal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from discovery.errors import RegistryError, RegistryUnavailable
from discovery.registry import etcd_aio
from discovery.registry.etcd_watch import ENDPOINT_DOWN, REQUIRE_LEADER
from discovery.retry import RetryAt, jittered

if TYPE_CHECKING:
    from discovery.registry.etcd_aio import AioChannels, Endpoint, LoopThread

log = logging.getLogger(__name__)

GONE_RETRY = 0.8  # seconds between renewals once the lease ran out (its instances are gone)
REFUSED_MAX = 30.0  # seconds: the longest wait before a refused grant or rewrite is tried again
LATE = 0.25  # seconds: an answer this late is not a member's own (module docstring)
PROBE = 2 * LATE  # seconds a member not known late has to answer a status call (docstring)
FAST = 0.05  # seconds: an answer this prompt is a member's own (module docstring)
PROMPT = 12  # renewals answered within FAST: a member, not a proxy (docstring)
HINT_AFTER = 3  # renewals answered late, far more than prompt: maybe a proxy (``hint``)


def retry_wait(ttl: float, interval: float, renewed: float) -> float:
    """After a round no member answered (a refusal: :class:`KeeperWaits`): the renewal
    interval or half of what is left of the lease, whichever is less (0.2 s at least),
    ±50 %. While the registry is down nothing reaches it, so the fleet's first renewals
    once it is back arrive spread over about one interval, as in steady state (etcd gives
    every lease a new TTL when it elects a leader); a host cut off alone still tries again
    before its lease runs out. Once the lease has run out its instances are gone from the
    registry: at most ``GONE_RETRY`` (±50 %) between tries then, so they are back within
    about a second of the link."""
    left = renewed + ttl - time.monotonic()
    if left <= 0:
        return jittered(min(interval, GONE_RETRY), 0.5)
    return jittered(max(min(interval, left / 2), 0.2), 0.5)


class KeeperWaits:
    """When the lease's keeper tries again after a failed round (module docstring): after a
    link down, :func:`retry_wait`; after a refusal, :attr:`refused`'s doubling wait (±25 %)
    before what was refused (a new lease, the rewrite) is tried again, a lease held renewed
    meanwhile. The keeper sleeps with :meth:`sleep`, which :meth:`back` cuts short."""

    def __init__(self, ttl: float, interval: float) -> None:
        self.ttl, self.interval = ttl, interval
        self.refused = RetryAt(GONE_RETRY, REFUSED_MAX)
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def after(self, failure: RegistryError | None, renewed: float, leased: bool,
              unwritten: bool) -> float:
        """The wait before the keeper's next round: after ``failure`` (:meth:`failed`); while
        a lease or a rewrite refused before waits for its turn (no lease or ``unwritten``:
        :meth:`pending`); else, all done (:meth:`succeeded`), one renewal interval."""
        if failure is not None:
            return self.failed(failure, renewed, leased)
        if not leased or unwritten:
            return self.pending(leased)
        self.succeeded()
        return jittered(self.interval)

    def due(self) -> bool:
        """Whether a new lease or the rewrite may be tried now (always, if none was refused)."""
        return time.monotonic() >= self.refused.due

    def failed(self, exc: RegistryError, renewed: float, leased: bool) -> float:
        """The wait before the next round after ``exc`` (``leased``: a lease is held, to be
        renewed meanwhile; ``renewed``: when it last was, monotonic)."""
        if isinstance(exc, RegistryUnavailable):
            log.debug("etcd lease keeper: %s", exc)
            self.refused.now()  # tried with the next round (a refusal's wait kept)
            return retry_wait(self.ttl, self.interval, renewed)
        wait = self.refused.failed(jitter=0.25)
        log.warning("etcd lease keeper: %s; tries again in %.2f s%s", exc, wait,
                    " (the lease renewed meanwhile)" if leased else "")
        return min(wait, jittered(self.interval)) if leased else wait

    def pending(self, leased: bool) -> float:
        """The wait before the next round while what was refused waits for its turn."""
        wait = self.refused.due - time.monotonic()
        if wait <= 0:  # due, but not tried (a lease lost meanwhile): soon, never busy
            wait = jittered(GONE_RETRY, 0.5)
        return min(wait, jittered(self.interval)) if leased else wait

    def succeeded(self) -> None:
        """A round did all it had to: a next refusal waits ``GONE_RETRY`` s again."""
        self.refused.succeeded()

    def back(self) -> None:
        """The registry is back after an outage, or granted a lease to another call: what
        was refused is tried within about ``GONE_RETRY`` s (±50 %) (any thread)."""
        if not self.refused.wait:
            return  # nothing refused: the keeper's waits are the outage's (retry_wait)
        self.refused.now()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the keeper is gone
                wake[0].call_soon_threadsafe(wake[1].set)

    async def sleep(self, seconds: float) -> None:
        """The keeper's wait between two rounds: ``seconds``, or until :meth:`back`, then
        ``GONE_RETRY`` s ±50 % (a fleet told at one moment does not try at one moment)."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        until, self._wake = loop.time() + seconds, (loop, event)
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            return
        finally:
            self._wake = None
        await asyncio.sleep(min(jittered(GONE_RETRY, 0.5), until - loop.time()))


class KeepAliveStream:
    """``renew(lease)``: one keepalive of ``lease`` on the open stream, its answer or an error
    in pyetcd's terms (transient ones: another member next). ``close()`` ends the stream.
    ``hint``: what to do behind ``etcd grpc-proxy`` ("": nothing), logged once (INFO) when
    a member answers as one does: ``HINT_AFTER`` renewals late, far more than prompt."""

    def __init__(self, client: Any, channels: AioChannels, loop: Callable[[], LoopThread],
                 late_wait: float = 0.0, hint: Callable[[], str] = str) -> None:
        self._client, self._channels, self._loop = client, channels, loop
        self._late_wait, self._hint = late_wait, hint
        self._late: set[str] = set()  # the members (netlocs) whose answers came late
        self._slow: Counter[str] = Counter()  # netloc: renewals it answered after LATE
        self._hinted = False
        self._prompt: Counter[str] = Counter()  # netloc: renewals it answered within FAST
        self._lock = threading.Lock()  # one renewal at a time
        self._stream: Any = None  # the open call (the loop's own)
        self._endpoint: Any = None  # the member it is on
        self._waiting: concurrent.futures.Future[list[Any]] | None = None
        self._closed = False

    def renew(self, lease: int) -> list[Any]:
        """The answer to one keepalive of ``lease`` (a stream that ended without one, as a
        proxy may end it: ConnectionFailedError, tried again on another)."""
        with self._lock:
            if self._closed:
                raise etcd_exc.ConnectionFailedError()
            self._waiting = waiting = self._loop().submit(self.renew_async(lease))
            try:  # renew_async keeps its own timeout; this one covers a loop that stopped
                return waiting.result(max(self._client.timeout, self._late_wait) + PROBE + 1)
            except concurrent.futures.CancelledError:  # close()
                raise etcd_exc.ConnectionFailedError() from None
            except concurrent.futures.TimeoutError:
                waiting.cancel()
                raise etcd_exc.ConnectionTimeoutError() from None
            finally:
                self._waiting = None

    async def renew_async(self, lease: int) -> list[Any]:
        """:meth:`renew` on the loop (the registry's keeper, which renews one at a time)."""
        if self._closed:
            raise etcd_exc.ConnectionFailedError()
        client = self._client
        if self._stream is not None and self._endpoint is not etcd_aio.chosen(client):
            self._drop()  # the calls went to another member: one connection, so this too
        if self._stream is None:
            self._endpoint, channel = self._channels.pick(client)
            self._stream = etcdrpc.LeaseStub(channel).LeaseKeepAlive(metadata=client.metadata)
        stream, endpoint = self._stream, self._endpoint
        answering = asyncio.ensure_future(self._answer(stream, endpoint, lease))
        try:
            if not await self._waited(answering, endpoint):
                self._drop()
                self._prompt.pop(endpoint.netloc, None)  # probed again next time
                endpoint.hung()  # as a DEADLINE_EXCEEDED call does
                raise etcd_exc.ConnectionTimeoutError()
            return answering.result()
        except grpc.RpcError as exc:
            self._drop()
            if exc.code() in ENDPOINT_DOWN:  # this member: another one next
                endpoint.fail()
                raise etcd_exc.ConnectionFailedError() from exc
            raise  # the registry's own handling (lease gone, token expired)
        except asyncio.CancelledError:
            self._drop()
            raise
        finally:
            answering.cancel()  # done by now, unless the renewal failed or was cancelled

    async def _waited(self, answering: asyncio.Future[list[Any]], endpoint: Endpoint) -> bool:
        """Whether the renewal was answered in time: within ``late_wait`` from a member known
        to be late; within the client's timeout from one known to be a member (``PROMPT``);
        else within the client's timeout, or, if from half-way on the member
        answers a status call (``PROBE`` s at most) though not the renewal, within
        ``late_wait`` (it defers renewals: late). A member that hangs answers neither, and
        is left after the client's timeout as before: the probe ran beside the wait."""
        timeout = self._client.timeout
        late = endpoint.netloc in self._late
        member = self._prompt[endpoint.netloc] >= PROMPT
        if late or member or self._late_wait <= timeout:
            wait = max(timeout, self._late_wait) if late else timeout
            done, _ = await asyncio.wait([answering], timeout=wait)
            return bool(done)
        done, _ = await asyncio.wait([answering], timeout=timeout / 2)
        if done:
            return True
        probing = asyncio.ensure_future(self._answers(endpoint))
        try:
            done, _ = await asyncio.wait([answering], timeout=timeout / 2)
            if done:
                return True
            if not await probing:
                return False
        finally:
            probing.cancel()  # done by now, unless answered first
        self._mark_late(endpoint)  # it answers at once, but not the renewal
        done, _ = await asyncio.wait([answering], timeout=self._late_wait - timeout)
        return bool(done)

    async def _answer(self, stream: Any, endpoint: Endpoint, lease: int) -> list[Any]:
        """Send one keepalive of ``lease`` on ``stream`` and read until its answer."""
        sent = time.monotonic()
        written = await etcd_aio.write(stream, etcdrpc.LeaseKeepAliveRequest(ID=lease))
        while True:
            answer = await stream.read() if written else grpc.aio.EOF
            if answer is grpc.aio.EOF:  # the stream ended without an error: not etcd's word
                self._drop()  # that the lease is gone (TTL 0 is), so another stream, not a
                raise etcd_exc.ConnectionFailedError()  # new lease (every instance rewritten)
            if lease == answer.ID:
                took = time.monotonic() - sent
                if took > LATE:
                    self._slow[endpoint.netloc] += 1
                    self._mark_late(endpoint)
                elif took <= FAST:
                    self._prompt[endpoint.netloc] += 1
                return [answer]
            # an answer for another lease (one we renewed before a new grant): not ours

    def _mark_late(self, endpoint: Endpoint) -> None:
        netloc = endpoint.netloc
        if netloc not in self._late:
            self._late.add(netloc)
            log.debug("etcd member %s answers renewals late: waiting up to %.3gs for them",
                      netloc, self._late_wait)
        # a proxy answers most renewals late, few within FAST (bench/proxy_renewals.py: 470
        # and 42 of 720); a member a few, in an election, and most within FAST
        slow, prompt = self._slow[netloc], self._prompt[netloc]
        if not self._hinted and slow >= HINT_AFTER and slow > 4 * prompt and (hint := self._hint()):
            self._hinted = True
            log.info("etcd at %s answers renewals as etcd grpc-proxy does (%d late, %d prompt); "
                     "%s", netloc, slow, prompt, hint)

    async def _answers(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` answers a status call within ``PROBE`` s, as a member with a
        leader (require-leader: a member without one, which cannot renew either, says so at
        once; etcd's proxy, which renews by itself, answers for the member it uses)."""
        stub = self._channels.stub(etcdrpc.MaintenanceStub, endpoint)
        try:
            await stub.Status(etcdrpc.StatusRequest(), timeout=PROBE,
                              metadata=REQUIRE_LEADER + tuple(self._client.metadata or ()))
        except grpc.RpcError:
            return False
        return True

    @property
    def endpoint(self) -> Endpoint | None:
        """The member of the stream (None before the first)."""
        return self._endpoint

    def close(self) -> None:
        """End the stream; a renewal waiting on it fails at once (no lock: it holds it)."""
        self._closed = True
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
        elif self._stream is not None:  # opened on the loop, so there is one
            self._loop().loop.call_soon_threadsafe(self._drop)

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
