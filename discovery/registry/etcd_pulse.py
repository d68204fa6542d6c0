"""How an etcd client that only watches learns that the cluster stopped answering.

A host that holds a lease hears from the cluster at every renewal (TTL/3): a renewal that
fails tells the registry's state listeners. A host that registers nothing (``discovery dns``
or ``watch`` alone, ``up`` with no container yet) has only its watch streams. Straight to the
members that is enough: a member that dies ends its streams at once. Through ``etcd
grpc-proxy`` it is not: the proxy keeps a client's watch stream open while every member
behind it is down (measured on etcd 3.4: still open 40 s after all members were SIGKILLed;
the proxy does not end it for the require-leader header and does not answer a progress
request), so the watcher would go on reporting "registry connected" while it serves a
catalog that nothing updates any more.

So while a registry watches and holds no lease, it reads one key once a TTL (±10 %), a
linearizable read (a serializable one the proxy may answer from its cache): the read goes
through ``_call``, which tells the listeners "up" when it succeeds and "down" when no member
answered within the registry's timeout. Then it asks a member's ``Status``, a best effort
whose failure changes no state (a restore from a backup is told by the member's raft index:
``etcd_rewind.ClusterSeen``). Cost: one single-key ``Range`` and one ``Status`` a TTL a
watch-only host, two thirds of what a lease's keepalives cost; nothing for a host with a lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from pyetcd import etcdrpc

from discovery.errors import RegistryError
from discovery.registry import etcd_aio, etcd_rewind
from discovery.registry.etcd_watch import REQUIRE_LEADER
from discovery.registry.security import rpc_details
from discovery.retry import jittered

log = logging.getLogger(__name__)


async def pulse(interval: float, needed: Callable[[], bool], read: Callable[[], object]
                ) -> None:
    """Every ``interval`` (±10 %), ``read()`` in the loop's executor when ``needed()``; its
    failure is the state listeners' news (``_call`` tells them), not this task's end."""
    while True:
        await asyncio.sleep(jittered(interval))
        if not needed():
            continue
        try:
            await asyncio.to_thread(read)
        except RegistryError:
            pass  # _call told the listeners
        except Exception:
            log.exception("etcd liveness read failed")


def read_alive(client: Any, prefix: str, watches: list[Any],
               cluster: etcd_rewind.ClusterSeen) -> Any:
    """One linearizable read of ``<prefix>/alive``'s count (a value put there never comes
    back), whose header is compared with the ``watches``' revisions and reads before."""
    return etcd_rewind.checked(watches, lambda: client.get_range_response(
        f"{prefix}/alive", None, count_only=True), lambda r: r.header, cluster)


def status(client: Any, watches: list[Any], cluster: etcd_rewind.ClusterSeen) -> None:
    """A member's ``Status``, whose raft index is compared with that member's before
    (``etcd_rewind.status_checked``): a best effort, whose failure changes no state."""
    c = client
    try:
        etcd_rewind.status_checked(watches, lambda: c.maintenancestub.Status(
            etcdrpc.StatusRequest(), c.timeout, credentials=c.call_credentials,
            metadata=REQUIRE_LEADER + tuple(c.metadata or ())), cluster)
    except (grpc.RpcError, *etcd_aio.TRANSIENT) as exc:  # no member right after a restart
        log.debug("etcd status for the restore check failed: %s", rpc_details(exc))
