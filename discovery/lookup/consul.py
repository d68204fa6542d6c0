"""Consul's read API and Prometheus HTTP service discovery, answered from the catalog.

Tools that already speak Consul (Prometheus ``consul_sd_configs``, Consul client libraries)
read our catalog unmodified: ``/v1/catalog/services``, ``/v1/catalog/service/<name>``,
``/v1/health/service/<name>``, ``/v1/catalog/datacenters`` and ``/v1/agent/self``, with
Consul's JSON field names and blocking queries (``?index=&wait=``, ``X-Consul-Index``).
``/v1/prometheus/sd`` answers Prometheus's ``http_sd_configs`` format. docs/http.md describes
both; :mod:`discovery.lookup.http` routes here.

Consul's index is the catalog's plus one: Consul never answers 0 (clients treat 0 as "no
index"), and blocking on ``?index=N`` waits for the catalog to pass ``N - 1``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote

from discovery.errors import ConfigError
from discovery.lookup.http_guard import dump_json
from discovery.lookup.http_query import ApiError, Request, Response, allow, blocking_params, flag
from discovery.model import Instance, State
from discovery.model.catalog import Catalog

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

#: blocks a request on the catalog: (catalog, request, index or None, wait) -> catalog index
Block = Callable[[Catalog, Request, "int | None", float], int]


def handles(path: str) -> bool:
    """Is ``path`` one of this module's endpoints?"""
    return path.startswith(PATHS)


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
    wait (shared slots and limits), ``node`` the name ``/v1/agent/self`` reports."""

    def __init__(self, catalog: Catalog, block: Block, datacenter: str = DEFAULT_DATACENTER,
                 node: str = "") -> None:
        self.catalog, self.block = catalog, block
        self.datacenter, self.node = datacenter, node

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
        if path == "/v1/catalog/services":
            allow(query, COMMON)
            index = self._wait(query, req)
            return self._json(self._services(), query, index)
        for head, render in (("/v1/catalog/service/", self._catalog_entry),
                             ("/v1/health/service/", self._health_entry)):
            if path.startswith(head) and len(path) > len(head):
                health = head.startswith("/v1/health/")
                allow(query, COMMON | {"tag"} | ({"passing"} if health else set()))
                passing = flag(query, "passing") if health else False
                index = self._wait(query, req)
                found = self.catalog.instances(unquote(path[len(head):]),
                                               tags=query.get("tag", []),
                                               include_draining=not passing)
                return self._json([render(i, index) for i in found], query, index)
        raise ApiError(404, f"no such endpoint: {path[:100]} (Consul-compatible: "
                            "/v1/catalog/services, /v1/catalog/service/NAME, "
                            "/v1/health/service/NAME, /v1/agent/self)")

    # ---- shared -----------------------------------------------------------------------------
    def _wait(self, query: dict[str, list[str]], req: Request) -> int:
        """Check the common parameters, block if asked; the Consul index to answer with."""
        self._datacenter(query)
        if "stale" in query and "consistent" in query:
            raise ApiError(400, "stale and consistent cannot both be given", "stale")
        index, wait = blocking_params(query)
        wanted = index - 1 if index else None  # Consul index N is catalog index N - 1
        return self.block(self.catalog, req, wanted, wait) + 1

    def _datacenter(self, query: dict[str, list[str]]) -> None:
        dc = query.get("dc", [self.datacenter])[0]
        if dc not in ("", self.datacenter):
            raise ApiError(400, f"unknown datacenter {dc[:64]!r} (this one is "
                                f"{self.datacenter!r})", "dc")

    def _json(self, data: Any, query: dict[str, list[str]], index: int | None = None
              ) -> Response:
        if index is None:
            index = self.catalog.index + 1
        headers = {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
                   "X-Consul-LastContact": "0", "X-Discovery-Index": str(index - 1)}
        return Response(200, dump_json(data, flag(query, "pretty")), headers=headers)

    def _node_id(self, node: str) -> str:
        return str(uuid.uuid5(_NODE_IDS, node))

    # ---- answers ----------------------------------------------------------------------------
    def _self(self) -> dict[str, Any]:
        return {"Config": {"Datacenter": self.datacenter, "PrimaryDatacenter": self.datacenter,
                           "NodeName": self.node, "NodeID": self._node_id(self.node),
                           "Server": False, "Version": _software_version(), "Revision": ""},
                "Member": {"Name": self.node, "Tags": {"dc": self.datacenter}},
                "Meta": {}, "Stats": {}, "Coord": None, "DebugConfig": {}}

    def _services(self) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {}
        for inst in self.catalog.instances():
            out.setdefault(inst.service, set()).update(inst.tags)
        return {name: sorted(tags) for name, tags in out.items()}

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
            "ServiceWeights": {"Passing": inst.weight, "Warning": 1},
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
                   "Weights": {"Passing": inst.weight, "Warning": 1},
                   "EnableTagOverride": False, "CreateIndex": index, "ModifyIndex": index}
        up = inst.state is State.UP
        check = {"Node": inst.node, "ServiceID": inst.id, "ServiceName": inst.service,
                 "ServiceTags": list(inst.tags), "Type": "", "Output": "", "Definition": {},
                 "CreateIndex": index, "ModifyIndex": index,
                 "CheckID": f"service:{inst.id}" if up else f"_service_maintenance:{inst.id}",
                 "Name": (f"Service '{inst.service}' check" if up
                          else "Service Maintenance Mode"),
                 "Status": "passing" if up else "critical",
                 "Notes": "" if up else "draining: the agent is taking it out of service"}
        return {"Node": node, "Service": service, "Checks": [check]}

    def _prometheus_sd(self, query: dict[str, list[str]]) -> Response:
        """Prometheus ``http_sd_configs``: one target group per instance (its node, tags and
        meta are its own), labels under ``__meta_discovery_``, all values strings."""
        allow(query, {"service", "tag", "up", "passing", "pretty"})
        up_only = flag(query, "up") or flag(query, "passing")
        service = query.get("service", [None])[0]
        index = self.catalog.index  # before the data: a client sending it back misses nothing
        found = self.catalog.instances(service, tags=query.get("tag", []),
                                       include_draining=not up_only)
        groups = [{"targets": [_target(i)], "labels": sd_labels(i)} for i in found]
        return Response(200, dump_json(groups, flag(query, "pretty")),
                        headers={"X-Discovery-Index": str(index)})


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
