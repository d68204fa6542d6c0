"""Airbnb Nerve's ZooKeeper record, both ways (``zk://…?format=nerve``).

Nerve's reporter writes one ephemeral *sequential* node per instance, ``<instance_id>_`` plus
ZooKeeper's 10-digit sequence, holding JSON ``{"host", "port", "name"}`` and, where set,
``"weight"``, ``"haproxy_server_options"`` and ``"labels"`` (a string map). Synapse and
Prometheus's ``nerve_sd_configs`` read ``host``/``port``/``name`` and ignore the rest.

We write ``host`` = address, ``port``, ``name`` = our instance id (it is also the node name's
prefix), ``weight``, and ``labels`` = meta plus what the format has no field for: ``node``,
``tags`` (comma-separated), ``state`` (only ``draining``), ``container_id``,
``container_name``, ``image``, ``zone`` (those label names are reserved: meta under them is not
carried). Before, the zone was not written: a watcher reading this layout routed no zone.

Reading (:func:`from_nerve`), nodes as Nerve writes them map to an :class:`Instance`:

- service: from the path; id: the node name without its sequence, with ``:<port>``
  appended (ours, ``node:container:port`` with a ``node`` label naming that node, is taken
  as it is), so two ports of one Nerve host are two instances and a restarted Nerve's new
  node is the same instance as its old one; a name that is no valid id as it is (upper
  case, another character, too long, or any other name with a ``:``) gives
  ``<node>-<8 hex digits of its SHA-256>:<port>``, so that two names never make one id
  (they were lower-cased, or the node taken alone: ``WEB1`` and ``web1``, or two IPv6 hosts
  whose addresses map to one node name, replaced each other in every catalog; a name with a
  ``:`` was taken whole, its two ports one instance);
- node: the ``node`` label, else the first DNS label of ``name`` or of the node name, else the
  host's address with ``-`` for dots; state ``up`` unless labelled ``draining``; zone: the
  ``zone`` label if it is a DNS label (any Nerve writer's too), else none;
- ``host`` must be an IP address and ``port`` 1..65535; a weight above 256 is taken as 256;
  labels that are not usable meta (bad key, not a scalar) are dropped.

Anything else (not JSON, too large or deep, no host or port) is :class:`InvalidRecord`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from discovery.errors import InvalidRecord, ValidationError
from discovery.model import validate as v
from discovery.model.instance import Instance, State, load_record

_SEQUENCE = re.compile(r"^(.+)_\d{10}$")
#: our ids' shape, ``<node>:<container>:<port>`` (the container's port, not the record's):
#: the one name with a ``:`` taken as it is, with a ``node`` label naming that node
_OURS = re.compile(r"[^:]+:[^:]*:\d{1,5}")
RESERVED = ("node", "tags", "state", "container_id", "container_name", "image", "zone")


def node_prefix(child: str) -> str:
    """A sequential node's name without ZooKeeper's ``_NNNNNNNNNN`` suffix."""
    m = _SEQUENCE.fullmatch(child)
    return m[1] if m else child


def to_nerve(inst: Instance) -> bytes:
    """The JSON Nerve's reporter would write for ``inst`` (plus our labels, see above)."""
    labels = {k: val for k, val in inst.meta.items() if k not in RESERVED}  # (not carried: a
    labels["node"] = inst.node  # meta ``zone`` made a zone of an instance with none)
    if inst.tags:
        labels["tags"] = ",".join(inst.tags)
    if inst.state is State.DRAINING:
        labels["state"] = State.DRAINING.value
    for name in ("container_id", "container_name", "image", "zone"):
        if value := getattr(inst, name):
            labels[name] = value
    data = {"host": inst.address, "port": inst.port, "name": inst.id, "weight": inst.weight,
            "labels": labels}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def from_nerve(raw: bytes | str, service: str, child: str, where: str,
               stamp: float = 0.0) -> Instance:
    """The instance a Nerve node holds; :class:`InvalidRecord` naming ``where`` otherwise.
    ``stamp``: when the node was last written (ZooKeeper's mtime), as ``registered_at``."""
    data = load_record(raw, where)
    try:
        return _instance(data, service, child, where, stamp)
    except InvalidRecord:
        raise
    except ValidationError as exc:
        raise InvalidRecord(f"{where}: {exc.culprit}", exc.reason) from None
    except Exception as exc:  # a stored value never escapes as a crash
        raise InvalidRecord(where, f"unusable Nerve record ({type(exc).__name__})") from None


def as_read(inst: Instance) -> Instance | None:
    """``inst`` as a reader gets it back from the node :func:`to_nerve` writes (the record
    carries less: meta under a reserved label name, a schema); None if it would not read."""
    try:
        return from_nerve(to_nerve(inst), inst.service, f"{inst.id}_0000000000", where=inst.id)
    except InvalidRecord:
        return None


def _instance(data: Any, service: str, child: str, where: str, stamp: float) -> Instance:
    if not isinstance(data, dict):
        raise InvalidRecord(where, "not a JSON object")
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not host:
        raise InvalidRecord(where, "no host")
    if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidRecord(where, "no port (an integer)")
    try:
        address = v.address("host", host)
    except ValidationError:
        raise InvalidRecord(where, f"host {host[:64]!r} is not an IP address") from None
    labels = data.get("labels") or {}
    if not isinstance(labels, dict):
        labels = {}
    text: dict[str, str] = {}
    for k, val in labels.items():
        if isinstance(k, str) and (scalar := _scalar(val)) is not None:
            text[k] = scalar
    name = data["name"] if isinstance(data.get("name"), str) else ""
    prefix = node_prefix(child)
    node = _node(text.get("node", ""), name, prefix, address)
    ours = _OURS.fullmatch(prefix) and text.get("node") == prefix.partition(":")[0]
    iid = prefix if ours else "" if ":" in prefix else f"{prefix}:{port}"  # "": a digest
    try:
        v.instance_id("id", iid)
    except ValidationError:  # (upper case, a character or a length an id cannot have, a :
        digest = hashlib.sha256(prefix.encode()).hexdigest()[:8]  # elsewhere): still one
        iid = f"{node}-{digest}:{port}"  # instance a name, as ZooKeeper tells nodes apart by it
    weight = data.get("weight", 100)
    if isinstance(weight, str) and weight.isascii() and weight.isdigit() and len(weight) < 6:
        weight = int(weight)  # as its port may be: Synapse puts either form in its config
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        weight = 100
    tags = [t for t in text.get("tags", "").split(",") if _is_label(t)][: v.MAX_TAGS]
    meta = {k: val for k, val in text.items() if k not in RESERVED and _meta_ok(k, val)}
    zone = labels.get("zone")  # a string that is a DNS label, else none (any writer's label,
    zone = zone if isinstance(zone, str) else ""  # hostile too; 1 or true are no zone)
    return Instance.shared(
        service=service, id=iid, node=node, address=address, port=v.port("port", port),
        tags=v.tags("tags", tags), weight=min(weight, 256),
        meta=dict(sorted(meta.items())[: v.MAX_META]),
        container_id=_text(text.get("container_id", "")),
        container_name=_text(text.get("container_name", "")), image=_text(text.get("image", "")),
        state=State.DRAINING if text.get("state") == State.DRAINING.value else State.UP,
        zone=zone if _is_label(zone) else "",
        registered_at=stamp if 0 < stamp < 1e11 else 0.0)


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    return None


def _is_label(value: str) -> bool:
    try:
        v.dns_label("tag", value)
    except ValidationError:
        return False
    return True


def _meta_ok(key: str, value: str) -> bool:
    try:
        v.meta("meta", {key: value})
    except ValidationError:
        return False
    return True


def _text(value: str) -> str:
    try:
        return v.text("text", value)
    except ValidationError:
        return ""


def _node(label: str, name: str, prefix: str, address: str) -> str:
    for candidate in (label, name, prefix):
        first = re.split(r"[.:]", candidate.lower(), maxsplit=1)[0]
        if _is_label(first):
            return first
    return re.sub(r"[^a-z0-9]+", "-", address.lower()).strip("-")[:63] or "nerve"
