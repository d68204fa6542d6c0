"""Starting the lookup endpoints (DNS, HTTP API) next to a watcher's catalog."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from discovery.errors import ConfigError
from discovery.lookup.handover import Listener, Taken, from_predecessor, offer
from discovery.lookup.status import Checks, Health, Maint
from discovery.lookup.ui import HistoryQuery, Views
from discovery.metrics import Metrics
from discovery.retry import backoff
from discovery.watcher.core import Watcher

log = logging.getLogger(__name__)
REBIND_WAIT = 20.0  # s: an address not handed over, bound once the previous process lets go
# (it closes what was not taken once its HTTP and DNS TCP requests are answered: up to ~12 s)


class Listening(Protocol):
    def listeners(self) -> list[Listener]: ...

    def stop(self, *, handoff: bool = False) -> None: ...


@dataclass
class Lookups:
    """The endpoints that were started; :meth:`stop` stops them all, :meth:`hand_over`
    first offers their sockets to the next process of the state dir."""

    started: list[Listening] = field(default_factory=list)
    dns_port: int | None = None
    http_port: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: why the endpoints taken over from the previous process did not start (the process
    #: then stops, ``on_failure``, and exits as a fresh start that cannot bind does)
    failed: str | None = None
    on_failure: Callable[[], None] = lambda: None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    def hand_over(self, state_dir: Path) -> None:
        """Leaving (SIGUSR2): answer on until the next process started on ``state_dir``
        answers on the same sockets (or :data:`~discovery.lookup.handover.OFFER_WAIT` s, or
        :meth:`cancel`), then stop without closing them under it."""
        listeners = [pair for item in self.started for pair in item.listeners()]
        if listeners and offer(state_dir, listeners, cancelled=self.cancelled.is_set):
            self.stop(handoff=True)

    def cancel(self) -> None:
        """SIGTERM while handing over: stop waiting for the next process."""
        self.cancelled.set()

    def start(self, starts: Sequence[Callable[[], Listening]]) -> None:
        for start in starts:
            with self._lock:
                if self._stopped:
                    return
                self.started.append(start())

    def take_over(self, ready: Callable[[float], bool],
                  starts: Sequence[tuple[bool, Callable[[], Listening]]], inherited: Taken) -> None:
        """Start on the previous process's listeners once ``ready`` (the catalog is loaded),
        tell it to let go, then bind those it did not hand over (``starts``: (inherits,
        start)): another address, which it may hold until it lets go (``0.0.0.0`` over
        ``127.0.0.1``), so that bind is tried for up to :data:`REBIND_WAIT` s."""
        try:
            while not ready(0.5):
                if self._stopped:
                    return
            self.start([start for inherits, start in starts if inherits])
            if not self._stopped:
                inherited.ack()
            for start in (start for inherits, start in starts if not inherits):
                for attempt in backoff(ConfigError, timeout=REBIND_WAIT, initial=0.1,
                                       maximum=1.0, jitter=0):
                    with attempt:
                        self.start([start])
        except Exception as exc:  # it runs without them otherwise, looking healthy
            log.exception("starting DNS/HTTP after the previous process failed: stopping")
            self.failed = f"DNS/HTTP not started after the previous process: {exc}"
            self.on_failure()
        finally:
            inherited.close()  # not acknowledged: the previous process answers on, then closes

    def stop(self, handoff: bool = False) -> None:
        with self._lock:
            self._stopped = True
            started, self.started = self.started, []
        for item in reversed(started):
            try:
                item.stop(handoff=handoff)
            except Exception:
                log.exception("stopping %s failed", type(item).__name__)


def predecessor(state_dir: Path | None, dns: str | None, http: str | None) -> Taken | None:
    """Before adopting HAProxy: the DNS/HTTP listeners of a process leaving ``state_dir``
    (waits for its offer while the addresses are busy; see :mod:`~discovery.lookup.handover`).
    """
    from discovery.lookup.dns import parse_listen as dns_listen
    from discovery.lookup.http import parse_listen as http_listen

    addresses: list[tuple[int, str, int]] = []
    if dns:
        bind, port = dns_listen(dns)
        addresses += [(socket.SOCK_DGRAM, bind, port), (socket.SOCK_STREAM, bind, port)]
    if http:
        bind, port = http_listen(http)
        addresses.append((socket.SOCK_STREAM, bind, port))
    return from_predecessor(state_dir, addresses)


def start_lookups(watcher: Watcher, metrics: Metrics, *, dns: str | None = None,
                  http: str | None = None, domain: str = "discovery.", ttl: int = 0,
                  dns_udp_answer_limit: int = 3,
                  extra_health: Health | None = None, maint: Maint | None = None,
                  checks: Checks | None = None, token: str | None = None,
                  datacenter: str = "dc1", node: str = "",
                  history: HistoryQuery | None = None,
                  inherited: Taken | None = None) -> Lookups:
    """Start DNS on ``dns`` and the HTTP API on ``http`` (``ADDRESS:PORT``; None: not started).
    ``token``: what HTTP writes must present (None: writes are refused); ``datacenter`` and
    ``node``: what the Consul-compatible endpoints report. ``inherited``: the listeners of
    the previous process (:func:`predecessor`), answered on instead of binding once
    ``watcher`` has loaded its catalog (the previous process answers until then), and that
    process told so."""
    out = Lookups(on_failure=lambda: watcher.stop())
    starts: list[tuple[bool, Callable[[], Listening]]] = []  # (on an inherited socket, start)
    try:
        if dns:  # imported only when asked for: an HTTP-only watcher never loads DNS code
            from discovery.lookup.dns import DnsServer
            from discovery.lookup.dns import parse_listen as dns_listen

            bind, port = dns_listen(dns)
            udp = inherited.pop("dns-udp", bind, port) if inherited else None
            tcp = inherited.pop("dns-tcp", bind, port) if inherited else None
            pair = (udp, tcp) if udp is not None and tcp is not None else None
            for sock in () if pair else (udp, tcp):  # half a pair: bind both afresh
                if sock is not None:
                    sock.close()
            server = DnsServer(watcher.catalog, bind, port, domain=domain, ttl=ttl,
                               on_query=metrics.dns_query,
                               udp_answer_limit=dns_udp_answer_limit)
            starts.append((pair is not None, lambda: server.start(pair)))
        if http:
            from discovery.lookup.http import HttpApi
            from discovery.lookup.http import parse_listen as http_listen
            from discovery.lookup.status import watcher_health

            bind, port = http_listen(http)
            base = watcher_health(watcher)

            def health() -> dict[str, dict[str, Any]]:
                return {**base(), **(extra_health() if extra_health else {})}

            api = HttpApi(watcher.catalog, health, metrics, bind, port, maint=maint,
                          checks=checks, token=token, datacenter=datacenter,
                          node=node, views=Views(history, watcher))
            sock = inherited.pop("http", bind, port) if inherited else None
            starts.append((sock is not None, lambda: api.start(sock)))
        if inherited is None:
            out.start([start for _, start in starts])
        else:
            threading.Thread(target=out.take_over, args=(watcher.wait_ready, starts, inherited),
                             name="lookups-takeover", daemon=True).start()
    except BaseException:
        out.stop()
        if inherited is not None:
            inherited.close()  # the previous process answers on, then closes them
        raise
    out.dns_port = server.port if dns else None
    out.http_port = api.port if http else None
    return out
