"""Starting the lookup endpoints (DNS, HTTP API) next to a watcher's catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from discovery.lookup.status import Checks, Health, Maint
from discovery.lookup.ui import HistoryQuery, Views
from discovery.metrics import Metrics
from discovery.watcher.core import Watcher

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass
class Lookups:
    """The endpoints that were started; :meth:`stop` stops them all."""

    started: list[Stoppable] = field(default_factory=list)
    dns_port: int | None = None
    http_port: int | None = None

    def stop(self) -> None:
        for item in reversed(self.started):
            try:
                item.stop()
            except Exception:
                log.exception("stopping %s failed", type(item).__name__)
        self.started.clear()


def start_lookups(watcher: Watcher, metrics: Metrics, *, dns: str | None = None,
                  http: str | None = None, domain: str = "discovery.", ttl: int = 0,
                  dns_udp_answer_limit: int = 3,
                  extra_health: Health | None = None, maint: Maint | None = None,
                  checks: Checks | None = None, token: str | None = None,
                  datacenter: str = "dc1", node: str = "",
                  history: HistoryQuery | None = None) -> Lookups:
    """Start DNS on ``dns`` and the HTTP API on ``http`` (``ADDRESS:PORT``; None: not started).
    ``token``: what HTTP writes must present (None: writes are refused); ``datacenter`` and
    ``node``: what the Consul-compatible endpoints report."""
    out = Lookups()
    try:
        if dns:  # imported only when asked for: an HTTP-only watcher never loads DNS code
            from discovery.lookup.dns import DnsServer
            from discovery.lookup.dns import parse_listen as dns_listen

            bind, port = dns_listen(dns)
            server = DnsServer(watcher.catalog, bind, port, domain=domain, ttl=ttl,
                               on_query=metrics.dns_query,
                               udp_answer_limit=dns_udp_answer_limit).start()
            out.started.append(server)
            out.dns_port = server.port
            log.info("DNS on %s:%d for domain %s", bind, server.port, domain)
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
                          node=node, views=Views(history, watcher)).start()
            out.started.append(api)
            out.http_port = api.port
            log.info("HTTP API on %s:%d", bind, api.port)
    except BaseException:
        out.stop()
        raise
    return out
