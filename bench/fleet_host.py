"""One simulated host of ``bench/fleet.py`` (issue 11 §3): the project's own registry and
:class:`~discovery.model.catalog.Catalog`, as ``discovery up`` runs them on a host, minus Docker
and HAProxy; its source address, instances and routed services; and the hooks that give each
host its own connection (ZooKeeper: its own source address; etcd: its own gRPC connection).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Change, Registry, open_registry
from discovery.registry.base import FIRST_READ
from discovery.registry.etcd_aio import LoopThread
from discovery.retry import Outage, spread

PREFIX = "/fleet"
HOT = "svc000"
VICTIM_BASE = 50_000  # victims' host numbers: 50,000 + 10 k (so that instance 0 is in svc000)


def source_ip(n: int) -> str:
    return f"127.20.{n // 250}.{n % 250 + 1}"


def from_own_source(url: str, n: int) -> str:
    """``url`` (``etcd://[user@]127.0.0.1:port,...``) naming host ``n``'s own source address
    for 127.0.0.1: ``bench/srcaddr.c`` connects it to 127.0.0.1 from there."""
    scheme, rest = url.split("://", 1)
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    return f"{scheme}://{auth}{at}{hosts.replace('127.0.0.1:', source_ip(n) + ':')}{slash}{path}"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def host_instances(n: int, count: int, services: int) -> list[Instance]:
    node = f"h{n:05d}"
    out = []
    for i in range(count):
        cid = f"{n:08x}{i:04x}".ljust(64, "0")
        port = 20000 + i
        out.append(Instance(
            service=f"svc{(n * count + i) % services:03d}", id=f"{node}:{cid[:12]}:{port}",
            node=node, address=source_ip(n), port=port, tags=("blue", "v2"),
            meta={"team": "payments", "zone": "eu-west-1a"}, container_id=cid,
            container_name=f"app-{n}-{i}", image="registry.local/app:1.2.3",
            registered_at=time.time()))
    return out


def put_back(registry: Registry, node: str, instances: list[Instance]) -> int:
    """What the agent's reconcile does with the registry: read ``node``'s entries (through its
    index), write what of ``instances`` is missing or changed. Returns how many were written."""
    have = registry.node_snapshot(node).instances
    missing = [inst for inst in instances
               if (seen := have.get(inst.key)) is None or not seen.same_registration(inst)]
    for inst in missing:  # stamped, as the agent stamps its writes
        registry.register(replace(inst, written_at=time.time()))
    return len(missing)


def watched_services(n: int, k: int, services: int) -> list[str]:
    if k <= 0:
        return []  # everything (no filter)
    rnd = random.Random(n)
    return [HOT, *(f"svc{s:03d}" for s in sorted(rnd.sample(range(1, services), k - 1)))]



_bind = threading.local()


def install_etcd_host_channels() -> None:
    """Every gRPC channel opened while ``_bind.source`` is set carries that host's own user
    agent. gRPC shares one connection among the channels of a process that have the same
    target and arguments; without this, the hosts of one worker would multiplex over a few
    connections. With it each simulated host has its own connection to a member."""
    from discovery.registry import etcd_aio

    original = etcd_aio.Endpoint

    class HostEndpoint(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, opts: Any = None, **kw: Any) -> None:
            source = getattr(_bind, "source", None)
            if source:
                opts = [*(opts or []), ("grpc.primary_user_agent", f"fleet-host/{source}")]
            super().__init__(*args, opts=opts, **kw)

    etcd_aio.Endpoint = HostEndpoint  # type: ignore[misc]




def relieve_grpc_process_costs() -> None:
    """A per-process cost of grpc-python that a host of its own does not feel, and a few
    hundred hosts in one process do. (Until ``b0256db`` also its 0.1 s wake-up of every thread
    blocked on a stream, ``grpc._common.MAXIMUM_WAIT_TIMEOUT``, raised to 5 s here: the etcd
    streams now run on an asyncio loop, and no host thread blocks on one.)"""
    import grpc._observability

    # grpc-python takes one process-wide lock at the start and the end of every call, to
    # look up its observability plugin (none is installed here, and none can be: nothing calls
    # set_plugin). With a few hundred hosts' threads on one GIL that lock convoys: growing
    # 500 -> 1,000 hosts, 181 of a worker's 837 threads were queued on it and lease grants
    # and puts missed their 5 s deadlines. A host of its own process has a few threads.
    assert grpc._observability._OBSERVABILITY_PLUGIN is None
    grpc._observability._plugin_lock = contextlib.nullcontext()


def install_zk_source_binding() -> None:
    """Every KazooClient opened while ``_bind.source`` is set connects from that address."""
    from kazoo.handlers import utils as kutils

    import discovery.registry.zk as zkmod
    from discovery.registry.zk_io import PollingHandler

    class BoundHandler(PollingHandler):  # the registry's own handler, bound to an address
        def __init__(self, source: str) -> None:
            super().__init__()
            self.source = source

        def create_connection(self, address: tuple[str, int], hostname: str | None = None,
                              timeout: float | None = None, use_ssl: bool = False,
                              **_kw: Any) -> socket.socket:
            assert not use_ssl, "the fleet bench runs without TLS"
            sock = socket.create_connection(address, timeout,
                                            source_address=(self.source, 0))
            kutils._set_default_tcpsock_options(socket, sock)
            return sock

    original = zkmod.zk_client_options

    def options(url: Any, secrets: Any) -> dict[str, Any]:
        out = original(url, secrets)
        source = getattr(_bind, "source", None)
        if source:
            out["handler"] = BoundHandler(source)
        return out

    zkmod.zk_client_options = options


class Host:
    def __init__(self, n: int, url: str, args: argparse.Namespace,
                 loop: LoopThread | None = None) -> None:
        self.n, self.url, self.args, self.loop = n, url, args, loop
        self.node = f"h{n:05d}"
        self.instances = host_instances(n, args.instances, args.services)
        self.watched = watched_services(n, args.watch_services, args.services)
        self.catalog = Catalog()
        self.registry: Registry | None = None  # the agent's and the watcher's, as in `up`
        self.watch: Any = None
        self.arm: Callable[[Catalog], bool] | None = None
        self.hit: float | None = None
        self.lock = threading.Lock()
        self.reconciles = self.reconcile_errors = self.reregistered = 0
        self.outage = Outage()  # as its registry's state listener tells
        #: the worker's Worker.schedule(n, delay): this host's next reconcile in delay seconds
        self.schedule: Callable[[int, float], None] | None = None

    def start(self) -> None:
        _bind.source = source_ip(self.n)
        try:
            self.registry = open_registry(self.url, ttl=self.args.ttl, loop=self.loop)
        finally:
            _bind.source = None
        self._name_threads()
        self.registry.add_state_listener(self.on_state)
        for inst in self.instances:
            self.registry.register(inst)
        # as a watcher starts: its watch's own first read is the catalog (FIRST_READ)
        self.watch = self.registry.watch(self.on_change, FIRST_READ, self.watched or None)

    def _name_threads(self) -> None:
        """ZooKeeper: the host's kazoo threads carry its name, so that the worker's log lines
        (``threadName``) tell whose connection dropped, waited or lost its session."""
        client = getattr(self.registry, "client", None)
        routine = getattr(getattr(client, "_connection", None), "_connection_routine", None)
        if isinstance(routine, threading.Thread):
            routine.name = f"{self.node}-zk"
        for i, t in enumerate(getattr(getattr(client, "handler", None), "_workers", ())):
            if isinstance(t, threading.Thread):
                t.name = f"{self.node}-zk-cb{i}"

    def on_change(self, change: Change) -> None:
        self.catalog.apply(change)
        if self.arm is not None and self.hit is None:
            self.check_hit()

    def check_hit(self) -> None:
        with self.lock:
            if self.arm is not None and self.hit is None and self.arm(self.catalog):
                self.hit = time.time()

    def follows(self, service: str) -> bool:
        return not self.watched or service in self.watched

    def reconcile(self) -> None:
        """What the agent's reconcile does with the registry: read this node's entries, write
        what is missing."""
        assert self.registry is not None
        if self.outage.holds_back(self.args.resync):
            return  # as the agent: none while its registry is down (on_state schedules one)
        self.reconciles += 1
        try:
            self.reregistered += put_back(self.registry, self.node, self.instances)
        except Exception:
            self.reconcile_errors += 1

    def on_state(self, up: bool) -> None:
        """The registry's state listener: as the agent, a host whose registry came back
        reconciles at a random moment within one resync period."""
        if self.outage.mark(up) and self.schedule is not None:
            self.schedule(self.n, spread(self.args.resync))

    def close(self, revoke: bool) -> None:
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.close(revoke=revoke)
