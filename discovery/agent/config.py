"""Agent settings: flags > env (DISCOVERY_*) > TOML file (--config) > defaults.

SIGHUP re-reads the file.
"""

from __future__ import annotations

import logging
import socket
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from discovery.agent.checks import CHECK_TYPES
from discovery.agent.spec import MAX_INTERVAL, CheckSpec, within_limits
from discovery.errors import ConfigError, ValidationError
from discovery.model import validate
from discovery.model.durations import parse_duration
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)


def default_node() -> str:
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return cleaned[:63] or "node"


#: settings a SIGHUP does not change: the registry (its URL, TTL), the node (its records and
#: maintenance are under its name) and Docker's client are made once
RESTART_ONLY = ("node", "registry", "ttl", "docker", "state_dir")


def restart_only(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    """``new``, a reload's, with what :data:`RESTART_ONLY` names kept as in ``old``; one
    warning names each kept setting (never its value: a registry URL may hold a password)."""
    kept = {f: getattr(old, f) for f in RESTART_ONLY if getattr(new, f) != getattr(old, f)}
    if kept:
        log.warning("reload: %s changed, ignored: restart the agent to change %s; the old %s "
                    "in effect", ", ".join(kept), "it" if len(kept) == 1 else "them",
                    "stays" if len(kept) == 1 else "stay")
    return replace(new, **kept)


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

    def validated(self, origin: Callable[[str], str] | None = None) -> AgentConfig:
        """This config, checked and normalised; a ConfigError names the culprit: ``origin(key)``
        (default ``--key``, the flag; :func:`merge` names the file and key a value came from)."""
        where = origin or _flag
        if not self.registry:
            raise ConfigError(
                "no registry: give --registry URL, DISCOVERY_REGISTRY or registry in --config"
            )
        try:
            RegistryURL.parse(self.registry)
            node = validate.dns_label(where("node"), self.node or default_node())
            address = validate.address(where("address"), self.address)
            zone = validate.dns_label(where("zone"), self.zone) if self.zone else ""
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        except ConfigError as exc:  # the registry URL
            raise ConfigError(_named(where("registry"), str(exc))) from None
        if self.docker:  # "" (an empty DISCOVERY_DOCKER): the default, as None
            check_docker_url(where("docker"), self.docker)
        if not 1.0 <= self.ttl <= 3600:
            raise ConfigError(f"{where('ttl')} {self.ttl}: must be between 1 and 3600 seconds")
        if not 0.5 <= self.resync <= 86400:
            raise ConfigError(f"{where('resync')} {self.resync}: must be between 0.5 and 86400 "
                              "seconds")
        return replace(self, node=node, address=address, zone=zone)


def _flag(key: str) -> str:
    return f"--{key}"


def _named(culprit: str, message: str) -> str:
    """``message`` about a value, prefixed with where it came from unless a flag (whose URL
    message says ``registry URL …`` already)."""
    return message if culprit.startswith("--") else f"{culprit}: {message}"


#: the schemes docker-py takes (``http+unix://`` too); a bare ``host:port`` is tcp
DOCKER_SCHEMES = ("unix", "tcp", "http", "https", "ssh", "npipe", "http+unix")


def check_docker_url(culprit: str, url: str) -> None:
    """A ConfigError naming ``culprit`` unless docker-py can connect to ``url``, so a typo
    fails at start instead of on every connection attempt."""
    from docker.errors import DockerException
    from docker.utils import parse_host

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{culprit} {url[:200]!r}: {reason} (give unix:///PATH, "
                           "tcp://HOST:PORT, https://HOST:PORT or ssh://[USER@]HOST)")

    scheme, sep, _ = url.strip().partition("://")
    if url.strip().startswith("/"):
        raise bad("a bare socket path (write unix://" + url.strip() + ")")
    if sep and scheme.lower() not in DOCKER_SCHEMES:
        raise bad(f"unknown scheme {scheme[:20]}://")
    if scheme.lower() == "npipe" and sys.platform != "win32":
        raise bad("npipe:// is Windows' only")
    try:
        parse_host(url, is_win32=sys.platform == "win32")
    except (DockerException, ValueError) as exc:
        raise bad(str(exc)[:200]) from None


FILE_KEYS = {f.name for f in fields(AgentConfig)} - {"config_file", "check"}
CHECK_KEYS = {"type", "interval", "timeout", "rise", "fall"}
_FILE_TYPES = {"ttl": "a number", "resync": "a number", "internal": "true or false"}  # else str


#: the top-level tables a config file may hold: the agent's, the watcher's, the services'
TABLES = {"agent": "[agent]", "watcher": "[watcher]", "services": "[services.NAME]"}


class FileValues(dict[str, Any]):
    """What :func:`read_file` found in the ``[agent]`` table, and the file it is in."""

    path: str = ""


def read_toml(path: str) -> dict[str, Any]:
    """A config file's TOML; a ConfigError naming the file when it cannot be read or parsed, or
    holds a top-level table (or key) other than those in :data:`TABLES` (a typo such as
    ``[agnet]`` would otherwise leave its settings silently unused)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise ConfigError(f"config file {path}: unknown table(s) or key(s) {names} at the top "
                          f"level (known tables: {', '.join(TABLES.values())})")
    return data


def read_file(path: str) -> FileValues:
    """Read the ``[agent]`` table (and ``[agent.check]`` defaults) of a TOML file."""
    data = read_toml(path)
    table = data.get("agent", {})  # a shared file also holds [watcher] and [services.*]
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [agent] must be a table")
    unknown = set(table) - FILE_KEYS - {"check"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    out = FileValues({k: table[k] for k in FILE_KEYS if k in table})
    out.path = path
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
    """Apply file values to every setting not given explicitly by flag or env. An error names
    the file and key of a value that came from the file, the flag of one that did not."""
    changes = {k: v for k, v in file_values.items() if k not in explicit}
    path = getattr(file_values, "path", "") or "?"

    def origin(key: str) -> str:
        return f"config file {path}: [agent] {key}" if key in changes else f"--{key}"

    for key, value in changes.items():
        want = _FILE_TYPES.get(key, "a string")
        if key != "check" and not {  # check: a CheckSpec already, made by read_file
            "a number": isinstance(value, int | float) and not isinstance(value, bool),
            "true or false": isinstance(value, bool),
            "a string": isinstance(value, str),
        }[want]:
            raise ConfigError(f"{origin(key)} must be {want}, not {value!r:.40}")
    try:
        return replace(base, **changes).validated(origin)
    except TypeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
