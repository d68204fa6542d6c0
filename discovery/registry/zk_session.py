"""The session timeout a ZooKeeper ensemble grants, and the reconnect policy that follows it.

A member grants a session timeout within its ``[minSessionTimeout, maxSessionTimeout]`` (by
default 2 and 20 x ``tickTime``: 4 to 40 s at ZooKeeper's sample 2,000 ms, 1 to 10 s at 500)
whatever the client asks for, and kazoo only logs the answer (at its lowest level).
:class:`SessionTimeout` reads it off every handshake. A dead host's instances leave after the
granted timeout, not after ``--ttl``, so when the two differ it says so, once a value, with
both figures and what to change; and the registry follows the granted one: its reconnect
window (:func:`connection_retry`: at most a third of the session timeout, or a host cut off
could wait past the end of its session; a longer period, where ``spread=`` asks for one,
while the whole ensemble is down and no session runs out) and its check for an ensemble
behind its zxid (after a session timeout cut off).
:func:`leave` stops a client without ending its session, as a killed process would.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import ConnectionClosedError, ConnectionDropped, SessionExpiredError
from kazoo.protocol import connection
from kazoo.protocol.serialization import Connect
from kazoo.retry import InterruptedError as Interrupted
from kazoo.retry import KazooRetry, RetryFailedError

from discovery.registry.ttl import ZK_RANGE, GrantedTtl
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)


class SessionTimeout:
    """The session timeout (s): ``asked`` until a member answers a handshake, then what the
    last one granted. :meth:`install` hooks a kazoo client's handshake."""

    def __init__(self, asked: float, where: str) -> None:
        self.asked = int(asked * 1000) / 1000  # what kazoo asks for: int(timeout * 1000) ms
        self.seconds = self.asked
        self._told = GrantedTtl("ZooKeeper", where, "sessions", ZK_RANGE)

    def window(self, spread: float) -> float:
        """The reconnect window: ``spread`` (the URL's ``spread=``), at most a third of the
        session timeout, 0.1 s at least."""
        return max(min(spread, self.seconds / 3), 0.1)

    def down_period(self, spread: float, members: int = 1) -> float | None:
        """How far apart a host tries while the whole ensemble is down (:class:`Answers`):
        ``spread`` where it is longer than the window (a third of the session timeout T), at
        most :data:`DOWN_SHARE` of T, less for ensembles of 5 members or more: once the quorum
        serves (its leader gave every session T again) the host's next point comes within the
        period, and the members still loading (a minority, each holding a handshake up to
        kazoo's T/members; :data:`HOLD_CAP_S` since the cap, the budget kept) must leave 5 %
        of T to spare: with 3 members 0.6 + 1/3 of T, with 5, 0.55 + 2/5. None where
        ``spread`` is within the window: no period then."""
        loading = (members - 1) // 2 / members
        period = min(spread, min(DOWN_SHARE, 0.95 - loading) * self.seconds)
        return period if period > self.window(spread) else None

    def write_timeout(self, members: int) -> float:
        """How long (s) one request's write may take: kazoo's connect time-out, the granted
        session timeout over the number of members (a registry URL names one at least)."""
        return self.seconds / members

    def install(self, client: Any, url: RegistryURL) -> None:
        """Make :func:`connection_retry` ``client``'s reconnect policy, and read the granted
        timeout off each of its handshakes: kazoo's ``ConnectionHandler._connect`` returns
        the read time-out it derives from it (2/3). kazoo takes a retry policy of its own
        class only (``type(...) is KazooRetry``), hence set here, before the client starts."""
        conn = client._connection
        if not (hasattr(conn, "_connect") and hasattr(conn, "retry_sleeper")
                and isinstance(client._conn_retry, KazooRetry)):
            raise TypeError(f"kazoo {client!r}: no handshake or retry policy to follow")
        retry = connection_retry(url, self)
        retry.interrupt = client._conn_retry.interrupt  # kazoo's: stop waiting once stopped
        retry.sleep_func = client.handler.sleep_func
        client._conn_retry, conn.retry_sleeper = retry, retry.copy()
        connect, invoke, answers = conn._connect, conn._invoke, retry.answers
        answers.timeout = client.handler.timeout_exception
        tcp = client.handler.create_connection

        def tcp_connect(*args: Any, **kwargs: Any) -> Any:
            """kazoo's TCP connect (its time-out: T), given up after :data:`CONNECT_CAP_S`
            with a period: silence, as before, but before TCP's SYN sent again at 1 s."""
            if answers.periodic and kwargs.get("timeout", CONNECT_CAP_S) > CONNECT_CAP_S:
                kwargs["timeout"] = CONNECT_CAP_S
            return tcp(*args, **kwargs)

        def handshake_read(timeout: float, request: Any, xid: int | None = None) -> Any:
            """kazoo's handshake request (its time-out: T/members), given up after
            :data:`HOLD_CAP_S` with a period: a member that holds it is up, not serving."""
            if not (answers.periodic and isinstance(request, Connect) and timeout > HOLD_CAP_S):
                return invoke(timeout, request, xid)
            try:
                return invoke(HOLD_CAP_S, request, xid)
            except answers.timeout:
                raise ConnectionDropped(f"a member held the handshake {HOLD_CAP_S:g} s: "
                                        "up, not serving") from None

        def handshake(host: str, hostip: str, port: int, *args: Any, **kwargs: Any) -> Any:
            if answers.periodic and answers.held:  # the rest of the pass waits for the retry
                raise ConnectionDropped("a member held the handshake: tried again later")
            began = time.monotonic()
            try:
                answer = connect(host, hostip, port, *args, **kwargs)
            except SessionExpiredError:
                answers.answered()  # a member that serves said so
                raise
            except BaseException as exc:  # (gevent's time-out is no Exception)
                answers.failed((host, port), exc, time.monotonic() - began >= HELD_S)
                raise
            answers.answered()
            try:  # (read time-out, connect time-out) in ms: not ours to break if that changed
                self.granted(round(answer[0] * 1.5))
            except Exception as exc:
                log.debug("ZooKeeper handshake: no granted session timeout in %r: %r", answer, exc)
            return answer

        conn._connect, conn._invoke = handshake, handshake_read
        client.handler.create_connection = tcp_connect

    def granted(self, granted_ms: int) -> None:
        """A member granted sessions of ``granted_ms``: follow it, and say so once a value if
        it is not what was asked for."""
        self.seconds = granted_ms / 1000
        self._told.check(self.seconds, self.asked)


#: the share of the session timeout a host may wait between attempts while the ensemble is
#: down: a new leader gives every session the whole timeout again as it starts serving
DOWN_SHARE = 0.6


#: s a handshake failed after for the member to have held it (bound its port, loading)
HELD_S = 0.5

#: s a handshake may go unanswered where the retry has a period (``spread=`` over the window):
#: then the member is taken to be up and not serving (kazoo waits T/members, 3.3 s at 10 s).
#: Members restarting together held the handshakes of 533 of 1,000 hosts for 2.2 s, then
#: served them at once (3.5 x steady); once a member serves, a handshake took 0.24 s at most
#: (1,000 hosts coming back, 2 cores)
HOLD_CAP_S = 1.0

#: s a TCP connect may take where the retry has a period: under TCP's first SYN sent again
#: (1 s). Members restarting (port bound, their accept queue full) dropped the connects of
#: 114 of 250 hosts, whose SYNs sent again 1.0-1.1 s later went through together as the
#: ensemble served (4.1 x steady); a connect not made within it is silence, as before
CONNECT_CAP_S = 0.5


class Answers:
    """What each member said to the handshakes of one pass over them (kazoo's connection loop
    tries each in turn, at each of its addresses), since the last one that answered:
    ``"no"``, the connection refused (nothing listens) or closed unanswered (a member up and
    not serving, and so also something between that resets this host's connections, or a
    member over ``maxClientCnxns`` for its address; with a period, a handshake held
    :data:`HOLD_CAP_S`), or ``"silent"``, no answer (a time-out, an unreachable network, TLS
    refused: the member may be serving the others while this host is cut off). ``members``:
    the ensemble's size. ``held``: a member held a handshake (:data:`HELD_S` or more) before
    it failed: one that bound its port and loads its data lets go of every host that tried
    it at once. ``periodic``: the retry has a period to wait
    while the ensemble is down (``spread=`` over the window); a pass that a member held then
    stops there, whether the host waits for points yet or not (a host whose connection a
    member shutting down held, then a member restarting, went on to one that served, with
    every host it held: 108 of 1,000 hosts in one restart)."""

    def __init__(self, members: int = 1, timeout: type[BaseException] = TimeoutError) -> None:
        self.members = members
        self.timeout = timeout  # the kazoo handler's time-out exception
        self.said: dict[tuple[str, int], str] = {}
        self.held = self.periodic = False

    def answered(self) -> None:
        self.said.clear()
        self.held = False

    def failed(self, member: tuple[str, int], exc: BaseException, held: bool = False) -> None:
        self.held = self.held or held
        cause = exc.__cause__ or exc.__context__  # kazoo wraps socket errors: ConnectionDropped
        silent = not isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) and (
            # (closed before the TLS handshake, as a member not serving does: a no)
            isinstance(exc, self.timeout) or not isinstance(exc, Exception)
            or (isinstance(cause, OSError) and not isinstance(cause, ConnectionError)))
        if silent or self.said.get(member) != "silent":  # (the worst of its addresses)
            self.said[member] = "silent" if silent else "no"

    def ensemble_down(self, already: bool = False) -> bool:
        """Whether the ensemble itself does not serve (stopped, restarting, without a quorum):
        every member refused the connection or closed it unanswered, none kept silent. A pass
        cut short counts only once seen down (``already``) or where a member held the
        handshake and stopped it (a member up, not serving): the first pass after a lost
        connection skips that member, and the others may serve.
        Its sessions then run out on nobody's clock: the leader it elects next gives each its
        whole timeout again. A host cannot tell that from every member refusing or closing
        its own connections while the ensemble serves the others (a firewall's ``REJECT``, a
        middlebox resetting them, ``maxClientCnxns``): ZooKeeper members restarting were seen
        to close connections as often as to refuse them (graceful shutdown, then elections).
        Hence a period only where ``spread=`` asks for more than the window."""
        said = list(self.said.values())
        return (bool(said) and "silent" not in said
                and (already or self.held or len(said) >= self.members))


class _Reconnect(KazooRetry):
    """kazoo's retry whose longest wait is read at every retry from the session timeout
    granted so far (kazoo's connection loop retries with a copy made when the client starts,
    before any handshake), and which, while the ensemble is down, tries at fixed points
    :meth:`SessionTimeout.down_period` apart from a random phase (:func:`connection_retry`)."""

    _cur_delay: float  # (kazoo's, set in its ``__init__`` and ``reset``)

    def __init__(self, spread: float, session: SessionTimeout, answers: Answers | None = None,
                 asked: bool = False, **kwargs: Any) -> None:
        self._spread, self._session, self._asked = spread, session, asked
        self.answers = answers or Answers()  # shared by the copies: the handshake tells it
        self._slot: float | None = None  # the next fixed point while the ensemble is down
        super().__init__(**kwargs)

    @property
    def max_delay(self) -> float:
        return self._session.window(self._spread) / 2

    @max_delay.setter
    def max_delay(self, _value: float) -> None:
        """Set by ``KazooRetry.__init__``: the window decides instead."""

    def reset(self) -> None:
        super().reset()
        self._slot = None
        self.answers.periodic = self._period() is not None

    def _period(self) -> float | None:
        """The down period, where ``spread=`` was asked for in the URL (not by default: with
        the default 3 s a session timeout under 9 s would have one)."""
        if not self._asked:
            return None
        return self._session.down_period(self._spread, self.answers.members)

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """kazoo's loop (``func``: one pass over the members), with :meth:`_wait`'s waits
        (kazoo's ``deadline`` is not kept: its connection retry has none)."""
        self.reset()
        while True:
            self.answers.answered()  # each pass is judged on its own
            try:
                return func(*args, **kwargs)
            except ConnectionClosedError:
                raise
            except self.retry_exceptions:
                self._attempts += 1
                if self._attempts == self.max_tries:
                    raise RetryFailedError("Too many retry attempts") from None
                left = self._wait()
                if not self.interrupt:
                    self.sleep_func(left)
                while self.interrupt and left > 0:  # as kazoo: 0.1 s steps, ``interrupt``
                    self.sleep_func(min(0.1, left))
                    left -= 0.1
                    if self.interrupt and self.interrupt():
                        raise Interrupted() from None

    def _wait(self) -> float:
        """While the ensemble is down (:meth:`Answers.ensemble_down`): until the next of this
        host's fixed points, one down period apart from a random one within the first. Else
        kazoo's own wait."""
        now = time.monotonic()
        period = self._period()
        self.answers.periodic = period is not None
        if period is not None and self.answers.ensemble_down(already=self._slot is not None):
            if self._slot is not None:
                self._slot += period
            if self._slot is None or self._slot <= now or self.answers.held:
                # the first, or after a pass a member held (it let go of every host that
                # tried it at once) or that went past its point: a new random phase
                self._slot = now + random.uniform(0, period)
            return self._slot - now
        self._slot = None
        wait = self._cur_delay * random.uniform(1 - self.max_jitter, 1 + self.max_jitter)
        self._cur_delay = min(wait * self.backoff, self.max_delay)
        return float(wait)

    def copy(self) -> _Reconnect:
        obj = _Reconnect(self._spread, self._session, self.answers, self._asked,
                         max_tries=self.max_tries,
                         delay=self.delay, backoff=self.backoff, max_jitter=self.max_jitter,
                         sleep_func=self.sleep_func, deadline=self.deadline,
                         interrupt=self.interrupt)
        obj.retry_exceptions = self.retry_exceptions
        return obj


def connection_retry(url: RegistryURL, session: SessionTimeout) -> KazooRetry:
    """kazoo's reconnect policy. Each attempt tries every member; after a lost connection the
    first comes within 0.2 s (another member takes over at once), each next one at a random
    moment within a resume spread (:meth:`SessionTimeout.window`: ``spread=``, at most a third
    of the session timeout, the granted one once known), so that a host cut off alone, whose
    session runs on, still tries every half window on average before it runs out.

    Where the URL's ``spread=`` asks for more than that window (``spread=6`` at a 10 s session
    timeout; the default 3 s never does), a host tries at fixed points ``spread`` apart (at
    most 0.6 of the session timeout: :meth:`SessionTimeout.down_period`) from a random phase
    while the whole ensemble is down (every member refused the connection or closed it
    unanswered, none kept silent: :meth:`Answers.ensemble_down`): no session runs out then,
    the leader elected next gives each the whole timeout again as it starts. A fleet comes
    back evenly over that period
    once the ensemble serves (a handshake a member holds is given up after
    :data:`HOLD_CAP_S` and the pass stops there, for a new random point: a member that loads
    its data lets go of every host that tried it at once). Within the
    window it does not: a host's next attempt is more often near the end of a short wait than
    of a long one, up to 2/window of the fleet came back in the first second (restart peak
    4.3 to 6.2 x steady at 250 to 1,000 hosts against 2.3 to 3.0 x in 29 restarts of 35;
    in six part of the fleet still came back at once: docs/operations.md). The
    cost, and why it is asked for, not the default: a host refused by every member while the
    ensemble serves the others (a firewall, a middlebox resetting its connections,
    ``maxClientCnxns``), or by one member that holds its handshake :data:`HOLD_CAP_S`, looks
    the same, and comes back up to a period after the heal."""
    # kazoo sleeps delay x uniform(1 - jitter, 1 + jitter), then delay = min(sleep x backoff,
    # max_delay): with jitter 1 and max_delay window/2, uniform(0, window) after the first.
    return _Reconnect(url.resume_spread, session, Answers(len(url.hosts)),
                      url.spread is not None, max_tries=-1, delay=0.1, backoff=1e6,
                      max_jitter=1.0)


def leave(client: Any) -> None:
    """Stop a started kazoo ``client`` without ending its session: the connection is dropped,
    no ``closeSession`` sent, so the ensemble keeps the session and its ephemeral nodes until
    its timeout, as after a SIGKILL, and a successor can take them over. (kazoo's ``stop``
    always ends the session, and its nodes go at once.) Uses kazoo's own connection-drop
    request; a kazoo without it is stopped the usual way, with a warning."""
    drop = getattr(connection, "_CONNECTION_DROP", None)
    if drop is None:
        log.warning("this kazoo cannot leave a session: ending it (its nodes go now)")
        client.stop()
        return
    client._stopped.set()
    client._queue.append((drop, None))
    with contextlib.suppress(OSError, AttributeError):  # already down: nothing to wake
        client._connection._write_sock.send(b"\0")
    client._safe_close()
