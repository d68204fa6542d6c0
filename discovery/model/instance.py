"""The instance record: what the agent writes and every reader reads."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from discovery.errors import InvalidRecord, ValidationError
from discovery.model import validate as v

SCHEMA_VERSION = 1


class State(StrEnum):
    UP = "up"
    DRAINING = "draining"


def make_instance_id(node: str, container_id: str, port: int) -> str:
    """Stable id: the same container port on the same node always gets the same id."""
    return f"{node}:{container_id[:12].lower()}:{port}"


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValidationError` if any field is unusable."""
        v.dns_label("service", self.service)
        v.instance_id("id", self.id)
        v.dns_label("node", self.node)
        v.address("address", self.address)
        v.port("port", self.port)
        if tuple(v.tags("tags", list(self.tags))) != tuple(self.tags):
            raise ValidationError("tags", "must be sorted and unique")
        v.weight("weight", self.weight)
        v.meta("meta", self.meta)
        v.text("container_id", self.container_id)
        v.text("container_name", self.container_name)
        v.text("image", self.image)
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
                self.schema) == (
                other.service, other.id, other.node, other.address, other.port, other.tags,
                other.weight, other.meta, other.container_id, other.container_name, other.image,
                other.state, other.schema)

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
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> Instance:
        if not isinstance(data, dict):
            raise InvalidRecord(where, "not a JSON object")
        try:
            schema = int(data.get("schema", SCHEMA_VERSION))
            if schema > SCHEMA_VERSION:
                raise InvalidRecord(where, f"schema {schema} is newer than {SCHEMA_VERSION}")
            tags = data.get("tags", [])
            meta = data.get("meta", {})
            if not isinstance(tags, list) or not isinstance(meta, dict):
                raise InvalidRecord(where, "tags must be a list and meta an object")
            port, weight = data["port"], data.get("weight", 100)
            if not isinstance(port, int) or not isinstance(weight, int):
                raise InvalidRecord(where, "port and weight must be integers")
            return cls(
                service=str(data["service"]),
                id=str(data["id"]),
                node=str(data["node"]),
                address=str(data["address"]),
                port=port,
                tags=v.tags("tags", [str(t) for t in tags]),
                weight=weight,
                meta=v.meta("meta", meta),
                container_id=str(data.get("container_id", "")),
                container_name=str(data.get("container_name", "")),
                image=str(data.get("image", "")),
                state=State(data.get("state", "up")),
                registered_at=float(data.get("registered_at", 0.0)),
                schema=schema,
            )
        except InvalidRecord:
            raise
        except ValidationError as exc:
            raise InvalidRecord(f"{where}: {exc.culprit}", exc.reason) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord(where, f"missing or bad field: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "record") -> Instance:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRecord(where, f"not JSON: {exc}") from None
        return cls.from_dict(data, where)
