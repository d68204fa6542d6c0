"""The session timeout a ZooKeeper ensemble grants, and the reconnect policy that follows it.

A member grants a session timeout within its ``[minSessionTimeout, maxSessionTimeout]`` (by
default 2 and 20 x ``tickTime``: 4 to 40 s at ZooKeeper's sample 2,000 ms, 1 to 10 s at 500)
whatever the client asks for, and kazoo only logs the answer (at its lowest level).
:class:`SessionTimeout` reads it off every handshake. A dead host's instances leave after the
granted timeout, not after ``--ttl``, so when the two differ it says so, once a value, with
both figures and what to change; and the registry follows the granted one: its reconnect
window (:func:`connection_retry`: at most a third of the session timeout, or a fleet that
lost its ensemble could wait past the end of its sessions) and its check for an ensemble
behind its zxid (after a session timeout cut off). :func:`leave` stops a client without
ending its session, as a killed process would.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from kazoo.protocol import connection
from kazoo.retry import KazooRetry

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
        connect = conn._connect

        def handshake(*args: Any, **kwargs: Any) -> Any:
            answer = connect(*args, **kwargs)
            try:  # (read time-out, connect time-out) in ms: not ours to break if that changed
                self.granted(round(answer[0] * 1.5))
            except Exception as exc:
                log.debug("ZooKeeper handshake: no granted session timeout in %r: %r", answer, exc)
            return answer

        conn._connect = handshake

    def granted(self, granted_ms: int) -> None:
        """A member granted sessions of ``granted_ms``: follow it, and say so once a value if
        it is not what was asked for."""
        self.seconds = granted_ms / 1000
        self._told.check(self.seconds, self.asked)


class _Reconnect(KazooRetry):
    """kazoo's retry whose longest wait is read at every retry from the session timeout
    granted so far: kazoo's connection loop retries with a copy made when the client starts,
    before any handshake."""

    def __init__(self, spread: float, session: SessionTimeout, **kwargs: Any) -> None:
        self._spread, self._session = spread, session
        super().__init__(**kwargs)

    @property
    def max_delay(self) -> float:
        return self._session.window(self._spread) / 2

    @max_delay.setter
    def max_delay(self, _value: float) -> None:
        """Set by ``KazooRetry.__init__``: the window decides instead."""

    def copy(self) -> _Reconnect:
        obj = _Reconnect(self._spread, self._session, max_tries=self.max_tries,
                         delay=self.delay, backoff=self.backoff, max_jitter=self.max_jitter,
                         sleep_func=self.sleep_func, deadline=self.deadline,
                         interrupt=self.interrupt)
        obj.retry_exceptions = self.retry_exceptions
        return obj


def connection_retry(url: RegistryURL, session: SessionTimeout) -> KazooRetry:
    """kazoo's reconnect policy. Each attempt tries every member; after a lost connection the
    first comes within 0.2 s (another member takes over at once), each next one at a random
    moment within a resume spread: a fleet that lost a restarted ensemble reconnects evenly
    over that window, not within the same second (kazoo's default doubling from 0.1 s brought
    every host back within ~1 s of the ensemble serving again), and still tries every 1.5 s
    on average, so a session outlives a busy recovery. The window is at most a third of the
    session timeout (:meth:`SessionTimeout.window`, the granted one once known).

    The reconnects are not quite even: a host waiting its turn is more often near the end of a
    short wait than of a long one, so more of them come early in the window. A fixed phase
    (one random wait, then one window apart) spreads them evenly (fleet bench, 250 hosts: peak
    4.0 x steady against 6.0 x) but leaves a session about three attempts: at 1,000 hosts 151
    sessions expired during a restart, against a few with this policy (docs/operations.md).
    Tried again with the fleet bench's greenlet hosts (no session lost): the attempts came
    evenly, the handshakes and the restart peak did not, and a host cut off alone reconnected
    later after the heal; docs/benchmarks.md has the runs."""
    # kazoo sleeps delay x uniform(1 - jitter, 1 + jitter), then delay = min(sleep x backoff,
    # max_delay): with jitter 1 and max_delay window/2, uniform(0, window) after the first.
    return _Reconnect(url.resume_spread, session, max_tries=-1, delay=0.1, backoff=1e6,
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
