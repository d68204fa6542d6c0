"""Agent settings: flags > env (DISCOVERY_*) > TOML file (--config) > defaults.

SIGHUP re-reads the file.
"""

from __future__ import annotations

import logging
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from discovery.agent.checks import CHECK_TYPES
from discovery.agent.spec import MAX_INTERVAL, CheckSpec, within_limits
from discovery.errors import ConfigError, ValidationError
from discovery.model import validate
from discovery.model.durations import parse_duration

log = logging.getLogger(__name__)


def default_node() -> str:
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return cleaned[:63] or "node"


@dataclass(frozen=True)
class AgentConfig:
    registry: str = ""
    node: str = ""
    address: str = "127.0.0.1"
    docker: str | None = None
    ttl: float = 10.0
    resync: float = 30.0
    internal: bool = False
    check: CheckSpec = field(default_factory=CheckSpec)
    config_file: str | None = None
    state_dir: str | None = None  # maintenance state (None: in memory only)
    zone: str = ""  # written into every instance record ("": none)

    def validated(self) -> AgentConfig:
        if not self.registry:
            raise ConfigError(
                "no registry: give --registry URL, DISCOVERY_REGISTRY or registry in --config"
            )
        try:
            node = validate.dns_label("--node", self.node or default_node())
            address = validate.address("--address", self.address)
            zone = validate.dns_label("--zone", self.zone) if self.zone else ""
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        if not 1.0 <= self.ttl <= 3600:
            raise ConfigError(f"--ttl {self.ttl}: must be between 1 and 3600 seconds")
        if not 0.5 <= self.resync <= 86400:
            raise ConfigError(f"--resync {self.resync}: must be between 0.5 and 86400 seconds")
        return replace(self, node=node, address=address, zone=zone)


FILE_KEYS = {f.name for f in fields(AgentConfig)} - {"config_file", "check"}
CHECK_KEYS = {"type", "interval", "timeout", "rise", "fall"}
_FILE_TYPES = {"ttl": "a number", "resync": "a number", "internal": "true or false"}  # else str


def read_file(path: str) -> dict[str, Any]:
    """Read the ``[agent]`` table (and ``[agent.check]`` defaults) of a TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    table = data.get("agent", {})  # a shared file also holds [watcher] and [services.*]
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [agent] must be a table")
    unknown = set(table) - FILE_KEYS - {"check"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    out = {k: table[k] for k in FILE_KEYS if k in table}
    check = table.get("check", {})
    if not isinstance(check, dict) or set(check) - CHECK_KEYS:
        raise ConfigError(f"config file {path}: [agent.check] takes only {sorted(CHECK_KEYS)}")
    if check:
        out["check"] = _check_defaults(path, check)
    return out


def _check_defaults(path: str, check: dict[str, Any]) -> CheckSpec:
    """``[agent.check]`` as a :class:`CheckSpec` within the check limits, or a ConfigError
    naming the key. Durations are seconds or strings like ``"500ms"``."""
    def key(name: str) -> str:
        return f"config file {path}: [agent.check] {name}"

    try:
        values = dict(check)
        if "type" in values and values["type"] not in CHECK_TYPES():
            known = ", ".join(sorted(CHECK_TYPES()))
            raise ValidationError(key("type"), f"unknown check type {str(values['type'])[:32]!r} "
                                  f"(known: {known})")
        for name in ("interval", "timeout"):
            if name in values:
                values[name] = parse_duration(key(name), values[name], minimum=0.05,
                                              maximum=MAX_INTERVAL)
        return within_limits(CheckSpec(**values), key, timeout_given="timeout" in values)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None
    except TypeError as exc:
        raise ConfigError(f"{key('')}: {exc}") from None


def merge(base: AgentConfig, file_values: dict[str, Any], explicit: set[str]) -> AgentConfig:
    """Apply file values to every setting not given explicitly by flag or env."""
    changes = {k: v for k, v in file_values.items() if k not in explicit}
    for key, value in changes.items():
        want = _FILE_TYPES.get(key, "a string")
        if key != "check" and not {  # check: a CheckSpec already, made by read_file
            "a number": isinstance(value, int | float) and not isinstance(value, bool),
            "true or false": isinstance(value, bool),
            "a string": isinstance(value, str),
        }[want]:
            raise ConfigError(f"config file: [agent] {key} must be {want}, not {value!r:.40}")
    try:
        return replace(base, **changes).validated()
    except TypeError as exc:
        raise ConfigError(f"config file: {exc}") from None
