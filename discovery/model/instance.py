"""The instance record: what the agent writes and every reader reads."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

from discovery.errors import InvalidRecord, ValidationError
from discovery.model import validate as v

SCHEMA_VERSION = 1
K = TypeVar("K")
V = TypeVar("V")
#: A record this size or larger is not parsed: the largest valid one (64 meta values of 512
#: characters, 32 tags) is about 40 KB. Nerve's and our own records are a few hundred bytes.
MAX_RECORD_BYTES = 64 * 1024
#: Brackets may nest this deep (a record needs 2: the object, then its tags list or meta).
MAX_DEPTH = 8
#: Decoded instances share what they repeat (see :meth:`Instance.shared`): one tags tuple and
#: one meta dict per distinct value, and the addresses validated, remembered up to this many of
#: each (then forgotten at once).
SHARED_MAX = 1024
#: ... of a meta dict, those whose keys and values hold at most this many characters: a cache
#: of the largest (64 values of 512) held ~45 MB on every watcher, filled by one record
#: written again with changing values
SHARED_META_CHARS = 1024
_INTERNED = ("service", "node", "address", "image", "zone")
_shared_tags: dict[tuple[str, ...], tuple[str, ...]] = {}
_shared_meta: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
_shared_addresses: dict[str, str] = {}


class State(StrEnum):
    UP = "up"
    DRAINING = "draining"


_STATES = frozenset(s.value for s in State)


#: How far ahead of a host's clock a write stamp (``written_at``) may be and still order writes
#: (a fleet's clocks differ by far less). One further ahead (written by a host whose clock was
#: far ahead, or by hand) orders nothing: the write after it is stamped now (:func:`stamp_after`),
#: and a watcher's wipe guard takes it for no stamp, trusting half as far (:func:`~discovery.
#: watcher.guard_burst.foreign_drain`): hosts whose clocks differ by less than that agree on it.
STAMP_AHEAD = 600.0


def trusted(stamp: float, now: float, ahead: float = STAMP_AHEAD) -> bool:
    """Whether ``stamp`` is at most ``ahead`` seconds ahead of ``now``: one to order writes by."""
    return stamp <= now + ahead


def stamp_after(previous: float, now: float) -> float:
    """A write's ``written_at``: ``now``, or just after ``previous`` (the key's stamp before)
    if the clock stepped back; ``now`` if ``previous`` is too far ahead to trust (:data:`
    STAMP_AHEAD`: followed, it would put every later write of the key as far ahead). A
    watcher's wipe guard takes a drain not stamped newer than the value it replaces for another
    writer's (:func:`~discovery.watcher.guard_burst.foreign_drain`)."""
    return max(now, previous + 0.001) if trusted(previous, now) else now


def make_instance_id(node: str, container_id: str, port: int) -> str:
    """Stable id: the same container port on the same node always gets the same id."""
    return f"{node}:{container_id[:12].lower()}:{port}"


def id_node(instance_id: str) -> str:
    """The node an id of :func:`make_instance_id` names (``<node>:<cid>:<port>``)."""
    return instance_id.partition(":")[0]


def made_on(node: str) -> Callable[[str], bool]:
    """Whether an id is one :func:`make_instance_id` gives on ``node`` (a Docker id is hex)."""
    pattern = re.compile(rf"{re.escape(node)}:[0-9a-f]{{12}}:[0-9]{{1,5}}")
    return lambda iid: pattern.fullmatch(iid) is not None


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    id: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    weight: int = 100
    meta: dict[str, str] = field(default_factory=dict)
    container_id: str = ""
    container_name: str = ""
    image: str = ""
    state: State = State.UP
    registered_at: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    #: when the agent saw what caused this write (a Docker event, a check transition, a
    #: maintenance call) and when it wrote the record; 0: unknown (older records)
    seen_at: float = 0.0
    written_at: float = 0.0
    #: the availability zone the instance runs in (a DNS label); "": none given
    zone: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def serving(self) -> bool:
        """Whether it takes new traffic: up, and a weight above 0 (HAProxy sends a server of
        weight 0 nothing new; a service with no instance serving answers 503)."""
        return self.state is State.UP and self.weight > 0

    @classmethod
    def shared(cls, **fields: Any) -> Instance:
        """An instance of values decoded from the registry, sharing what instances repeat: the
        service, node, address, image and zone strings are interned, and an equal tags tuple or
        meta dict is the same object in every instance (a watcher holds the whole fleet: this
        halves its memory). The meta dict may be shared: never change an instance's meta.

        What is shared has been validated: a tags tuple, meta dict or address is remembered
        only once an instance holding it passed :meth:`validate`, which then checks it no
        more (a fleet's records repeat a few of each: decoding one costs half as much)."""
        for name in _INTERNED:
            if type(fields.get(name)) is str:
                fields[name] = sys.intern(fields[name])
        tags, meta = fields.get("tags"), fields.get("meta")
        new_tags = new_meta = None
        if isinstance(tags, tuple) and all(type(t) is str for t in tags):
            found = _shared_tags.get(tags)
            if found is None:
                found = new_tags = tuple(map(sys.intern, tags))
            fields["tags"] = found
        items: tuple[tuple[str, str], ...] = ()
        if isinstance(meta, dict) and all(type(x) is str for kv in meta.items() for x in kv) \
                and sum(len(k) + len(x) for k, x in meta.items()) <= SHARED_META_CHARS:
            items = tuple(meta.items())
            shared = _shared_meta.get(items)
            if shared is None:
                shared = new_meta = {sys.intern(k): sys.intern(x) for k, x in items}
            fields["meta"] = shared
        inst = cls(**fields)
        if new_tags is not None:
            _remember(_shared_tags, new_tags, new_tags)
        if new_meta is not None:
            _remember(_shared_meta, items, new_meta)
        if inst.address not in _shared_addresses:
            _remember(_shared_addresses, inst.address, inst.address)
        return inst

    def validate(self) -> None:
        """Raise :class:`ValidationError` if any field is unusable (tags, meta and the
        address: unless :meth:`shared` remembers that very value, validated before)."""
        v.dns_label("service", self.service)
        v.instance_id("id", self.id)
        v.dns_label("node", self.node)
        if _cached(_shared_addresses, self.address) is None:
            v.address("address", self.address)
        v.port("port", self.port)
        if (_cached(_shared_tags, self.tags) is not self.tags
                and tuple(v.tags("tags", list(self.tags))) != tuple(self.tags)):
            raise ValidationError("tags", "must be sorted and unique")
        v.weight("weight", self.weight)
        if not isinstance(self.meta, dict) or _cached(_shared_meta, tuple(
                self.meta.items())) is not self.meta:
            v.meta("meta", self.meta)
        v.text("container_id", self.container_id)
        v.text("container_name", self.container_name)
        v.text("image", self.image)
        if not isinstance(self.zone, str):
            raise ValidationError("zone", f"{self.zone!r:.40} is not a string")
        if self.zone:
            v.dns_label("zone", self.zone)
        if not isinstance(self.state, State):
            raise ValidationError("state", f"{self.state!r} is not up|draining")

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)

    def with_state(self, state: State) -> Instance:
        return replace(self, state=state)

    def same_registration(self, other: Instance) -> bool:
        """Equal apart from registered_at: re-writing would change nothing (hot path: no copies)."""
        return (self.service, self.id, self.node, self.address, self.port, self.tags, self.weight,
                self.meta, self.container_id, self.container_name, self.image, self.state,
                self.schema, self.zone) == (
                other.service, other.id, other.node, other.address, other.port, other.tags,
                other.weight, other.meta, other.container_id, other.container_name, other.image,
                other.state, other.schema, other.zone)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "service": self.service,
            "id": self.id,
            "node": self.node,
            "address": self.address,
            "port": self.port,
            "tags": list(self.tags),
            "weight": self.weight,
            "meta": dict(self.meta),
            "container_id": self.container_id,
            "container_name": self.container_name,
            "image": self.image,
            "state": self.state.value,
            "registered_at": self.registered_at,
            **({"seen_at": self.seen_at} if self.seen_at else {}),
            **({"written_at": self.written_at} if self.written_at else {}),
            **({"zone": self.zone} if self.zone else {}),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> Instance:
        """An instance from a parsed record; :class:`InvalidRecord` naming ``where`` for any
        value that is missing, of the wrong type, out of range or not finite. Never another
        exception: whatever a stored value holds, the caller gets an Instance or one error.
        ``where`` (a registry key: anyone's text) is named escaped and shortened."""
        where = v.shown(where)
        try:
            return cls._from_dict(data, where)
        except InvalidRecord:
            raise
        except ValidationError as exc:
            raise InvalidRecord(f"{where}: {exc.culprit}", exc.reason) from None
        except KeyError as exc:
            raise InvalidRecord(where, f"missing field {exc}") from None
        except Exception as exc:  # a stored value never escapes as a crash
            raise InvalidRecord(where, f"unusable value ({type(exc).__name__}: "
                                f"{v.shown(str(exc), 120)})") from None

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Instance:
        if not isinstance(data, dict):
            raise InvalidRecord(where, "not a JSON object")
        schema = data.get("schema", SCHEMA_VERSION)
        if not _is_int(schema) or schema < 1:
            raise InvalidRecord(where, f"schema must be a positive integer, not {schema!r:.40}")
        if schema > SCHEMA_VERSION:
            raise InvalidRecord(where, f"schema {schema} is newer than {SCHEMA_VERSION}")
        tags, meta = data.get("tags", []), data.get("meta", {})
        if not isinstance(tags, list) or not isinstance(meta, dict):
            raise InvalidRecord(where, "tags must be a list and meta an object")
        port, weight = data["port"], data.get("weight", 100)
        if not _is_int(port) or not _is_int(weight):
            raise InvalidRecord(where, "port and weight must be integers")
        stamps = {name: data.get(name, 0.0) for name in ("registered_at", "seen_at", "written_at")}
        for name, stamp in stamps.items():
            if not _is_number(stamp) or not 0 <= stamp < 1e11:
                raise InvalidRecord(where, f"{name} must be a finite number of seconds")
        text = {name: data.get(name, "")
                for name in ("container_id", "container_name", "image", "zone")}
        text |= {name: data[name] for name in ("service", "id", "node", "address")}
        text["state"] = data.get("state", "up")
        for name, value in text.items():
            if not isinstance(value, str):
                raise InvalidRecord(where, f"{name} must be a string")
        if not all(isinstance(t, str) for t in tags):
            raise InvalidRecord(where, "tags must be strings")
        if text["state"] not in _STATES:
            raise InvalidRecord(where, f"state {text['state']!r:.40} is not up|draining")
        return cls.shared(
            service=text["service"], id=text["id"], node=text["node"],
            address=text["address"], port=port, weight=weight,
            tags=(tuple(tags) if _cached(_shared_tags, tuple(tags)) is not None
                  else v.tags("tags", tags)),
            meta=(meta if _cached(_shared_meta, tuple(meta.items())) is not None
                  else v.meta("meta", meta)),
            container_id=text["container_id"],
            container_name=text["container_name"], image=text["image"],
            state=State(text["state"]), registered_at=float(stamps["registered_at"]),
            schema=schema, seen_at=float(stamps["seen_at"]),
            written_at=float(stamps["written_at"]), zone=text["zone"],
        )

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "record") -> Instance:
        """An instance from a stored value: :func:`load_record`, then :meth:`from_dict`."""
        return cls.from_dict(load_record(raw, where), where)


def _remember(cache: dict[K, V], key: K, value: V) -> V:
    """``value``, remembered under ``key`` (a full cache is emptied first: bounded)."""
    if len(cache) >= SHARED_MAX:
        cache.clear()
    cache[key] = value
    return value


def _cached(cache: dict[K, V], key: K) -> V | None:
    """What ``cache`` remembers under ``key``; None for a key it cannot hold (unhashable)."""
    try:
        return cache.get(key)
    except TypeError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (an int too large for a float is not one: its stamp is none)."""
    if _is_int(value):
        return bool(-1e308 < value < 1e308)
    return isinstance(value, float) and math.isfinite(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is not a finite number")
    return number


def _nesting(raw: bytes) -> int:
    """How deep brackets nest in ``raw``, outside strings (JSON's own string rules)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members; a name given twice is refused (parsers disagree on which wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"member {twice[:40]!r} given twice")
    return out


#: json.loads with these hooks builds a decoder a call; this one serves every record
_RECORD_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite,
                                object_pairs_hook=_unique)


def load_record(raw: bytes | str, where: str = "record") -> Any:
    """Parse a stored value as strict JSON: at most :data:`MAX_RECORD_BYTES`, brackets nested
    at most :data:`MAX_DEPTH` deep, no ``NaN``/``Infinity`` and no number that overflows a
    float, UTF-8, no object member given twice. Anything else is one :class:`InvalidRecord`
    naming ``where`` (escaped and shortened: :func:`~discovery.model.validate.shown`);
    nothing escapes."""
    where = v.shown(where)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) >= MAX_RECORD_BYTES:
        raise InvalidRecord(where, f"value too large ({len(data)} >= {MAX_RECORD_BYTES} bytes)")
    # Fast path: a record with few brackets cannot nest deeply (bytes.count runs in C).
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and _nesting(data) > MAX_DEPTH:
        raise InvalidRecord(where, f"JSON nested deeper than {MAX_DEPTH}")
    try:
        return _RECORD_JSON.decode(data.decode("utf-8", "surrogatepass"))  # UTF-8 only
    except Exception as exc:  # ValueError, RecursionError, ...
        raise InvalidRecord(where, f"not JSON: {v.shown(str(exc), 120)}") from None
