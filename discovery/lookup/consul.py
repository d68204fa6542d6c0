"""Consul's read API and Prometheus HTTP service discovery, answered from the catalog.

Tools that already speak Consul (Prometheus ``consul_sd_configs``, Consul client libraries)
read our catalog unmodified: ``/v1/catalog/services``, ``/v1/catalog/service/<name>``,
``/v1/health/service/<name>``, ``/v1/catalog/datacenters`` and ``/v1/agent/self``, with
Consul's JSON field names and blocking queries (``?index=&wait=``, ``X-Consul-Index``).
``/v1/prometheus/sd`` answers Prometheus's ``http_sd_configs`` format. docs/http.md describes
both; :mod:`discovery.lookup.http` routes here.

``X-Consul-Index`` is the catalog's index, the one ``/v1/services`` and ``/v1/prometheus/sd``
send as ``X-Discovery-Index``: based on the clock at process start, so it never repeats across
restarts (a client holding an index of the previous process must not be given it again with
other data) and never 0 (clients read 0 as "no index"). Until the catalog has its first
snapshot the catalog reads are Consul's ``500 No cluster leader``, not an empty answer;
``X-Consul-KnownLeader``/``X-Consul-LastContact`` follow the registry connection (:class:`Contact`).
Other paths of Consul's API are ``501``: a 404 reads as "key absent" to Consul's clients.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from discovery.errors import ConfigError
from discovery.lookup.http_guard import dump_json
from discovery.lookup.http_query import (
    ApiError,
    Request,
    Response,
    allow,
    blocking_params,
    filters,
    flag,
    up_only,
)
from discovery.model import Instance, State
from discovery.model.catalog import LISTING, Catalog

if TYPE_CHECKING:
    from discovery.watcher.core import Watcher

DEFAULT_DATACENTER = "dc1"
PATHS = ("/v1/catalog/", "/v1/health/service/", "/v1/agent/self", "/v1/prometheus/sd")
#: Consul's query parameters every endpoint takes; ``token`` is ignored, as is the
#: ``X-Consul-Token`` header (reads need none here)
ANY = {"pretty", "token"}
#: those of the catalog reads, mostly ignored too: we have one consistent catalog
COMMON = ANY | {"dc", "index", "wait", "stale", "consistent", "cached"}
_DATACENTER = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})$")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_]")
_NODE_IDS = uuid.UUID("6f1a3a8e-1c9b-4e0e-9a55-2d1f0b7c4e11")  # namespace for node UUIDs
SD_PREFIX = "__meta_discovery_"
#: the sections of Consul's HTTP API (``/v1/<section>/...``): paths in them we do not serve
#: are 501, so that Consul's clients fail loudly instead of reading "absent" from a 404
CONSUL_SECTIONS = ("kv", "agent", "catalog", "health", "status", "session", "acl", "event",
                   "txn", "coordinate", "query", "operator", "connect", "config", "internal")
#: ``/v1/health`` itself is ours (component status): only Consul's own health paths are 501
CONSUL_HEALTH = ("node", "checks", "service", "connect", "ingress", "state")
NO_LEADER = "No cluster leader"

#: blocks a request on the catalog: (catalog, request, index or None, wait) -> catalog index
Block = Callable[[Catalog, Request, "int | None", float, "str | None"], int]


def handles(path: str) -> bool:
    """Is ``path`` one of this module's endpoints?"""
    return path.startswith(PATHS)


def unsupported(path: str) -> bool:
    """Is ``path`` in Consul's API (a client expects Consul there) though not served here?"""
    parts = path.split("/", 4)  # "", "v1", section[, first part of the rest]
    if len(parts) < 3 or parts[:2] != ["", "v1"] or parts[2] not in CONSUL_SECTIONS:
        return False
    return parts[2] != "health" or (len(parts) > 3 and parts[3] in CONSUL_HEALTH)


def not_implemented(path: str, why: str = "") -> ApiError:
    """The 501 for a path of Consul's API that is not served here."""
    return ApiError(501, f"{path[:100]}: not implemented; {why or 'this is not a Consul server'}"
                         " (Consul-compatible reads: /v1/catalog/services, "
                         "/v1/catalog/service/NAME, /v1/health/service/NAME, /v1/agent/self, "
                         "/v1/catalog/datacenters; see docs/http.md)")


class Contact:
    """The registry connection, as Consul reports its leader: ``X-Consul-KnownLeader`` false
    while the watcher's registry connection is down, ``X-Consul-LastContact`` the milliseconds
    since it was last up (0 while it is). ``connected`` None: no registry to lose."""

    def __init__(self, connected: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._connected, self._clock = connected, clock
        self._lock = threading.Lock()
        self._lost_at: float | None = None  # when the connection was last seen going down
        self._since = clock()  # never heard of: counted from here

    @classmethod
    def of(cls, watcher: Watcher) -> Contact:
        """Follow ``watcher``'s registry connection."""
        contact = cls(lambda: bool(watcher.registry_connected))
        watcher.registry.add_state_listener(contact.changed)
        return contact

    def changed(self, up: bool) -> None:
        """A registry state listener: told when the connection comes and goes."""
        with self._lock:
            if up:
                self._lost_at = None
            elif self._lost_at is None:
                self._lost_at = self._clock()

    def last_contact(self) -> int | None:
        """None while connected, else the milliseconds since the connection was last up."""
        if self._connected is None or self._connected():
            return None
        with self._lock:
            since = self._lost_at if self._lost_at is not None else self._since
        return max(0, int((self._clock() - since) * 1000))


def parse_datacenter(value: str) -> str:
    """``--datacenter``: lowercase letters, digits, ``-`` and ``_``, at most 63 characters."""
    if not _DATACENTER.fullmatch(value or ""):
        raise ConfigError(f"--datacenter {value[:64]!r}: use lowercase a-z, 0-9, '-' and '_', "
                          "1-63 characters, as Consul does")
    return value


def label_name(key: str) -> str:
    """A meta key as the tail of a Prometheus label name (``[A-Za-z0-9_]``; ``.``/``-`` → ``_``)."""
    return _LABEL_BAD.sub("_", key)


def _software_version() -> str:
    try:
        return version("discovery")
    except PackageNotFoundError:
        return "0"


class ConsulApi:
    """The Consul-compatible endpoints over ``catalog``; ``block`` is the HTTP API's blocking
    wait (shared slots and limits), ``node`` the name ``/v1/agent/self`` reports, ``contact``
    the registry connection (None: always connected)."""

    def __init__(self, catalog: Catalog, block: Block, datacenter: str = DEFAULT_DATACENTER,
                 node: str = "", contact: Contact | None = None) -> None:
        self.catalog, self.block = catalog, block
        self.datacenter, self.node = datacenter, node
        self.contact = contact or Contact()

    def route(self, path: str, query: dict[str, list[str]], req: Request) -> Response:
        if path == "/v1/prometheus/sd":
            return self._prometheus_sd(query)
        if path == "/v1/agent/self":
            allow(query, ANY | {"dc"})  # Consul's Go client sends its datacenter everywhere
            self._datacenter(query)
            return self._json(self._self(), query)
        if path == "/v1/catalog/datacenters":
            allow(query, ANY | {"dc"})
            self._datacenter(query)
            return self._json([self.datacenter], query)
        if path == "/v1/catalog/services":  # waits for the list of services, not any change
            allow(query, COMMON)
            index = self._wait(query, req, LISTING)
            return self._json(self.catalog.listing(), query, index)
        for head, render in (("/v1/catalog/service/", self._catalog_entry),
                             ("/v1/health/service/", self._health_entry)):
            if path.startswith(head) and len(path) > len(head):
                health = head.startswith("/v1/health/")
                allow(query, COMMON | {"tag"} | ({"passing"} if health else set()))
                passing = flag(query, "passing") if health else False
                # Consul matches names and tags case-insensitively; our names are lowercase
                name = unquote(path[len(head):]).lower()
                index = self._wait(query, req, name)  # waits for a change of this service
                found = self.catalog.instances(name, include_draining=not passing)
                wanted = {t.casefold() for t in query.get("tag", [])}
                found = [i for i in found if wanted <= {t.casefold() for t in i.tags}
                         and not (passing and _warning(i))]
                return self._json([render(i, index) for i in found], query, index)
        raise not_implemented(path)

    # ---- shared -----------------------------------------------------------------------------
    def _wait(self, query: dict[str, list[str]], req: Request, service: str | None = None
              ) -> int:
        """Check the common parameters, block if asked; the Consul index to answer with.
        Consul's 500s: no catalog yet (no snapshot: nothing to answer from, where ``[]``
        would drop every target of consul_sd), or ``?consistent`` without the registry."""
        self._datacenter(query)
        if "stale" in query and "consistent" in query:
            raise ApiError(400, "stale and consistent cannot both be given", "stale")
        index, wait = blocking_params(query)
        flag(query, "pretty")  # a bad value is a 400 at once, not after the wait
        self._consistent(query)  # at once: never holding a blocking slot to say it later
        answered = self.block(self.catalog, req, index, wait, service)
        if not self.catalog.loaded:
            raise ApiError(500, f"{NO_LEADER}: the catalog has not loaded its first snapshot "
                                "from the registry yet (see /v1/health); retry",
                           headers=self._leader_headers())
        self._consistent(query)  # the registry lost while it blocked
        return answered

    def _consistent(self, query: dict[str, list[str]]) -> None:
        if "consistent" in query and self.contact.last_contact() is not None:
            raise ApiError(500, f"{NO_LEADER}: the registry connection is down, so a "
                                "consistent read cannot be answered; the default and ?stale "
                                "read the last known catalog", "consistent",
                           headers=self._leader_headers())

    def _datacenter(self, query: dict[str, list[str]]) -> None:
        dc = query.get("dc", [self.datacenter])[0]
        if dc not in ("", self.datacenter):
            raise ApiError(400, f"unknown datacenter {dc[:64]!r} (this one is "
                                f"{self.datacenter!r})", "dc")

    def _json(self, data: Any, query: dict[str, list[str]], index: int | None = None
              ) -> Response:
        if index is None:
            index = self.catalog.index
        headers = {"X-Consul-Index": str(index), "X-Discovery-Index": str(index),
                   **self._leader_headers()}
        return Response(200, dump_json(data, flag(query, "pretty")), headers=headers)

    def _leader_headers(self) -> dict[str, str]:
        lost = self.contact.last_contact()
        return {"X-Consul-KnownLeader": "true" if lost is None else "false",
                "X-Consul-LastContact": str(lost or 0)}

    def _node_id(self, node: str) -> str:
        return str(uuid.uuid5(_NODE_IDS, node))

    # ---- answers ----------------------------------------------------------------------------
    def _self(self) -> dict[str, Any]:
        return {"Config": {"Datacenter": self.datacenter, "PrimaryDatacenter": self.datacenter,
                           "NodeName": self.node, "NodeID": self._node_id(self.node),
                           "Server": False, "Version": _software_version(), "Revision": ""},
                "Member": {"Name": self.node, "Tags": {"dc": self.datacenter}},
                "Meta": {}, "Stats": {}, "Coord": None, "DebugConfig": {}}

    def _tagged(self, inst: Instance) -> dict[str, dict[str, Any]]:
        family = "ipv6" if ":" in inst.address else "ipv4"
        return {f"{where}_{family}": {"Address": inst.address, "Port": inst.port}
                for where in ("lan", "wan")}

    def _catalog_entry(self, inst: Instance, index: int) -> dict[str, Any]:
        return {
            "ID": self._node_id(inst.node), "Node": inst.node, "Address": inst.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": inst.address, "wan": inst.address}, "NodeMeta": {},
            "ServiceKind": "", "ServiceID": inst.id, "ServiceName": inst.service,
            "ServiceTags": list(inst.tags), "ServiceAddress": inst.address,
            "ServiceTaggedAddresses": self._tagged(inst), "ServicePort": inst.port,
            "ServiceMeta": dict(inst.meta),
            "ServiceWeights": _weights(inst),
            "ServiceEnableTagOverride": False, "CreateIndex": index, "ModifyIndex": index,
        }

    def _health_entry(self, inst: Instance, index: int) -> dict[str, Any]:
        node = {"ID": self._node_id(inst.node), "Node": inst.node, "Address": inst.address,
                "Datacenter": self.datacenter,
                "TaggedAddresses": {"lan": inst.address, "wan": inst.address}, "Meta": {},
                "CreateIndex": index, "ModifyIndex": index}
        service = {"ID": inst.id, "Service": inst.service, "Tags": list(inst.tags),
                   "Address": inst.address, "TaggedAddresses": self._tagged(inst),
                   "Meta": dict(inst.meta), "Port": inst.port,
                   "Weights": _weights(inst),
                   "EnableTagOverride": False, "CreateIndex": index, "ModifyIndex": index}
        up = inst.state is State.UP
        status, notes = "passing", ""
        if not up:
            status, notes = "critical", "draining: the agent is taking it out of service"
        elif _warning(inst):
            status, notes = "warning", WEIGHT_0_NOTE
        check = {"Node": inst.node, "ServiceID": inst.id, "ServiceName": inst.service,
                 "ServiceTags": list(inst.tags), "Type": "", "Output": "", "Definition": {},
                 "CreateIndex": index, "ModifyIndex": index,
                 "CheckID": f"service:{inst.id}" if up else f"_service_maintenance:{inst.id}",
                 "Name": (f"Service '{inst.service}' check" if up
                          else "Service Maintenance Mode"),
                 "Status": status, "Notes": notes}
        return {"Node": node, "Service": service, "Checks": [check]}

    def _prometheus_sd(self, query: dict[str, list[str]]) -> Response:
        """Prometheus ``http_sd_configs``: one target group per instance (its node, tags and
        meta are its own), labels under ``__meta_discovery_``, all values strings."""
        allow(query, {"service", "tag", "up", "passing", "pretty"})
        only_up = up_only(query)
        service = query.get("service", [None])[0]
        tags = filters(service, query)
        index = self.catalog.index  # before the data: a client sending it back misses nothing
        if not self.catalog.loaded:  # Prometheus keeps its targets on an error, not on []
            raise ApiError(503, "the catalog has not loaded its first snapshot from the "
                                "registry yet (see /v1/health); retry",
                           headers={"Retry-After": "1"})
        found = self.catalog.instances(service, tags=tags, include_draining=not only_up)
        groups = [{"targets": [_target(i)], "labels": sd_labels(i)} for i in found]
        return Response(200, dump_json(groups, flag(query, "pretty")),
                        headers={"X-Discovery-Index": str(index)})


WEIGHT_0_NOTE = ("weight 0: up, but takes no new traffic (Consul has no Passing weight "
                 "below 1: Weights.Warning 0, and ?passing leaves it out)")


def _warning(inst: Instance) -> bool:
    """An up instance of weight 0: Consul's "warning" (its weights cannot say 0 otherwise)."""
    return inst.state is State.UP and inst.weight < 1


def _weights(inst: Instance) -> dict[str, int]:
    """Consul's weights: ``Passing`` is at least 1 (Consul's ValidateWeights), so weight 0
    is ``Passing 1, Warning 0`` with a warning check: weighted readers send it nothing."""
    if inst.weight < 1:
        return {"Passing": 1, "Warning": 0}
    return {"Passing": inst.weight, "Warning": 1}


def _target(inst: Instance) -> str:
    host = f"[{inst.address}]" if ":" in inst.address else inst.address
    return f"{host}:{inst.port}"


def sd_labels(inst: Instance) -> dict[str, str]:
    """An instance's ``http_sd`` labels. Meta keys become label names (``.``/``-`` → ``_``);
    when two keys meet in one name, the first in sorted order wins."""
    labels = {"service": inst.service, "id": inst.id, "node": inst.node,
              "address": inst.address, "port": str(inst.port), "state": inst.state.value,
              "weight": str(inst.weight), "tags": _joined(inst.tags)}
    out = {SD_PREFIX + k: v for k, v in labels.items()}
    for key in sorted(inst.meta):
        out.setdefault(f"{SD_PREFIX}meta_{label_name(key)}", inst.meta[key])
    return out


def _joined(tags: Iterable[str]) -> str:
    """Tags as Consul's Prometheus SD joins them: ``,a,b,`` (so ``.*,a,.*`` matches a tag)."""
    items = list(tags)
    return f",{','.join(items)}," if items else ""
