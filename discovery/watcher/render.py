"""Render the local HAProxy config from the watcher's settings and slot tables.

:func:`build_context` turns :class:`WatcherConfig` plus the slots of every backend into
plain dicts, lists, strings and numbers, re-validating every value that came from the
registry. :class:`Renderer` feeds that to a Jinja2 template (the packaged default or the
operator's copy) and refuses to write any value that could end a line or start a comment,
so nothing from a label or the registry can inject an HAProxy directive. Identical inputs
give byte-identical output.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import traceback
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError

from discovery.errors import ConfigError, RenderError, ValidationError
from discovery.model import validate
from discovery.model.endpoint import Endpoint
from discovery.watcher.config import (
    BACKEND_TIMEOUTS,
    FRONTEND_TIMEOUTS,
    HASH_BALANCE,
    ServiceConfig,
    WatcherConfig,
)
from discovery.watcher.sandbox import RENDER_LIMIT_S, TemplateEnvironment
from discovery.watcher.slots import Slot

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "haproxy.cfg.j2"
STATS_BIND = "127.0.0.1"
SLOT_STATES = ("ready", "drain", "maint")
MAX_SOCKET_PATH = 107  # sun_path
_PATH = re.compile(r"/[A-Za-z0-9._/@+=-]{0,4095}")
_SLOT_NAME = re.compile(r"s[1-9][0-9]{0,5}")
_BAD_CHARS = set("#'\"\\")  # comment, quotes, escape: HAProxy's parser acts on them
_CONTROL = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})  # incl. \n \r \u2028 NUL
#: the ASCII a value may hold, matched in one call: printable, less _BAD_CHARS. Any other text
#: takes the character-by-character path, which names the culprit (the context check at 1,000
#: services x 10 took 0.48-0.73 s that way, 0.13-0.20 s this way)
_SAFE_VALUE = re.compile(r"[\x20\x21\x24-\x26\x28-\x5b\x5d-\x7e]*")
#: the same for a whole rendered config: printable ASCII, tabs and line breaks
_SAFE_TEXT = re.compile(r"[\x20-\x7e\t\n]*")


@dataclass(frozen=True)
class RuntimePaths:
    """Files HAProxy is told about. ``state_file`` None: no server-state file (see README)."""

    admin_socket: str | Path
    state_file: str | Path | None = None
    pid_file: str | Path | None = None

    def __post_init__(self) -> None:
        for name in ("admin_socket", "state_file", "pid_file"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str | Path) or not _PATH.fullmatch(str(value)):
                raise ConfigError(
                    f"{name}: {str(value)[:64]!r} must be an absolute path of letters, digits "
                    "and ._/@+=-"
                )
        if len(str(self.admin_socket).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"admin_socket: longer than {MAX_SOCKET_PATH} bytes")


def _control_reason(text: str, allowed: str = "") -> str | None:
    for ch in text:
        if ch not in allowed and unicodedata.category(ch) in _CONTROL:
            return f"control character {ord(ch):#06x} not allowed"
    return None


def unsafe_reason(value: str) -> str | None:
    """Why ``value`` cannot be written into an HAProxy config line, or None if it can."""
    if _SAFE_VALUE.fullmatch(value):
        return None
    for ch in value:
        if ch in _BAD_CHARS:
            return f"character {ch!r} not allowed"
    return _control_reason(value)


def _bind_endpoint(bind: str, port: int) -> str:
    """``bind`` (already a canonical bind address, maybe the wildcard) and ``port`` as
    HAProxy's ``bind`` takes them."""
    return f"[{bind}]:{port}" if ipaddress.ip_address(bind).version == 6 else f"{bind}:{port}"


def _slot_context(service: str, index: int, slot: Slot, ips: dict[str, validate.IP]
                  ) -> dict[str, Any]:
    """One slot's variables. ``ips``: the addresses this render parsed so far (an address
    repeats in a backend's spare slots and among a host's instances): each is parsed once."""
    where = f"{service} slot #{index + 1}"
    if not isinstance(slot, Slot):
        raise ValidationError(where, "not a Slot")
    name = validate.text(f"{where} name", slot.name)
    if name != f"s{index + 1}" or not _SLOT_NAME.fullmatch(name):
        raise ValidationError(f"{where} name", f"{name[:16]!r} is not s{index + 1}")
    where = f"{service}/{name}"
    if isinstance(slot.port, bool) or not isinstance(slot.port, int):
        raise ValidationError(f"{where} port", f"{slot.port!r} is not a number")
    ip = ips.get(slot.address) if type(slot.address) is str else None
    if ip is None:
        ip = ips[slot.address] = validate.unicast_ip(f"{where} address", slot.address)
    endpoint = Endpoint(ip, validate.port(f"{where} port", slot.port))
    if isinstance(slot.weight, bool) or not isinstance(slot.weight, int):
        raise ValidationError(f"{where} weight", f"{slot.weight!r} is not a number")
    weight = validate.weight(f"{where} weight", slot.weight)
    if slot.state not in SLOT_STATES:
        raise ValidationError(
            f"{where} state", f"{str(slot.state)[:16]!r} is not ready|drain|maint"
        )
    iid = slot.instance_id
    if iid:
        validate.instance_id(f"{where} instance_id", iid)
    return {
        "name": name,
        "address": endpoint.address,
        "port": endpoint.port,
        "endpoint": str(endpoint),
        # HAProxy's config form of drain is weight 0: it then keeps serving only
        # persistent sessions, and a reload keeps it drained.
        "weight": 0 if slot.state == "drain" else weight,
        "instance_weight": weight,
        "state": slot.state,
        "disabled": slot.state == "maint",
        "instance_id": iid,
    }


def _service_context(svc: ServiceConfig, slots: Sequence[Slot], ips: dict[str, validate.IP]
                     ) -> dict[str, Any]:
    name = validate.dns_label("service", svc.name)
    bind = validate.bind_address(f"services.{name}.bind", svc.bind)
    port = validate.port(f"services.{name}.port", svc.port)
    if not slots:
        raise RenderError(f"service {name}: no slots (allocate at least one)")
    return {
        "name": name,
        "bind": bind,
        "port": port,
        "listen": _bind_endpoint(bind, port),
        "mode": svc.mode,
        "balance": svc.balance,
        "hash_type": "consistent" if svc.balance in HASH_BALANCE else None,
        "maxconn": svc.maxconn,
        "check": svc.check,
        "check_options": " ".join(svc.check_options),
        "httpchk": svc.httpchk,
        "server_options": " ".join(svc.server_options),
        "tags": list(svc.tags),
        "frontend_timeouts": {k: v for k, v in svc.timeouts.items() if k in FRONTEND_TIMEOUTS},
        "backend_timeouts": {k: v for k, v in svc.timeouts.items() if k in BACKEND_TIMEOUTS},
        "slots": [_slot_context(name, n, slot, ips) for n, slot in enumerate(slots)],
    }


def build_context(
    config: WatcherConfig, slots: Mapping[str, Sequence[Slot]], paths: RuntimePaths
) -> dict[str, Any]:
    """The template's variables (see templates/README.md). Raises :class:`ValidationError`
    for a bad slot value and :class:`RenderError` for a configured service without slots."""
    extra = sorted(set(slots) - set(config.services))
    if extra:
        log.debug("slots for unconfigured services ignored: %s", ", ".join(extra[:10]))
    services = []
    ips: dict[str, validate.IP] = {}
    for name in sorted(config.services):
        if name not in slots:
            raise RenderError(f"service {name}: no slots (allocate at least one)")
        services.append(_service_context(config.services[name], slots[name], ips))
    stats = None
    if config.stats_port is not None:
        stats = {"bind": STATS_BIND, "port": config.stats_port}
        stats["listen"] = _bind_endpoint(STATS_BIND, config.stats_port)
    return {
        "watcher": {"maxconn": config.maxconn, "timeouts": dict(config.timeouts)},
        "paths": {
            "admin_socket": str(paths.admin_socket),
            "state_file": None if paths.state_file is None else str(paths.state_file),
            "pid_file": None if paths.pid_file is None else str(paths.pid_file),
        },
        "stats": stats,
        "services": services,
    }


def _check_value(value: object, origin: str) -> None:
    """Walk the context: only plain data, and no string that could break a config line.
    The plain case is proven at once (:func:`_plainly_safe`); otherwise the walk names the
    first culprit."""
    if not _plainly_safe(value):
        _find_culprit(value, origin)


def _plainly_safe(value: object) -> bool:
    """Whether ``value`` is made of dicts (string keys), lists, tuples, None, numbers and
    strings of :data:`_SAFE_VALUE` alone: every string is matched in one call (a context of
    1,000 services x 10 holds ~250,000), a container met twice once. False does not mean
    unsafe, only "walk it". A dict's plain values are taken in its own loop (most of a
    context is the slots' dicts of strings and numbers)."""
    strings: list[str] = []
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings.append(item)
            continue
        if isinstance(item, dict | list | tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            strings.extend(item)
            for member in item.values():
                kind = type(member)
                if kind is str:
                    strings.append(member)
                elif not (kind is int or kind is bool or member is None):
                    stack.append(member)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif item is not None and not isinstance(item, bool | int | float):
            return False
    return _SAFE_VALUE.fullmatch(" ".join(strings)) is not None


def _find_culprit(value: object, origin: str) -> None:
    """Raise :class:`RenderError` naming the first value that may not be rendered."""
    if isinstance(value, str):
        reason = unsafe_reason(value)
        if reason:
            raise RenderError(f"refusing to render {origin} = {value[:64]!r}: {reason}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or unsafe_reason(key):
                raise RenderError(f"refusing to render {origin}: bad key {str(key)[:64]!r}")
            _find_culprit(item, f"{origin}.{key}")
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            _find_culprit(item, f"{origin}[{n}]")
    elif value is not None and not isinstance(value, bool | int | float):
        raise RenderError(f"refusing to render {origin}: unsupported type {type(value).__name__}")


def _finalize(value: object) -> object:
    """Last line of defence for every ``{{ ... }}``, including values a template computes."""
    if value is None:
        raise RenderError("the template printed None (guard optional values with {% if %})")
    if isinstance(value, jinja2.Undefined):
        return value
    reason = unsafe_reason(str(value))
    if reason:
        raise RenderError(f"refusing to write {str(value)[:64]!r}: {reason}")
    return value


class Renderer:
    """A compiled template; :meth:`render` turns a context into the config text."""

    def __init__(self, template_path: str | Path | None = None) -> None:
        path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
        self.template_path = path
        # Sandboxed: a template may read its context, nothing else (no attribute walks to
        # os/subprocess, no mutation); check-config promises to run nothing.
        self._lock = threading.Lock()
        self._env = env = TemplateEnvironment(
            loader=jinja2.FileSystemLoader(str(path.parent)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_finalize,
        )
        try:
            self._template = env.get_template(path.name)
        except jinja2.TemplateSyntaxError as exc:
            where = f"{exc.filename or path}:{exc.lineno}"
            raise RenderError(f"template {where}: syntax error: {exc.message}") from None
        except jinja2.TemplateNotFound:
            raise RenderError(f"template {path}: not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RenderError(f"template {path}: {exc}") from None
        except (RecursionError, MemoryError) as exc:  # e.g. thousands of nested ( or {% if %}
            raise RenderError(f"template {path}: too deeply nested to compile "
                              f"({type(exc).__name__})") from None

    def render(self, context: Mapping[str, Any], limit: float = RENDER_LIMIT_S) -> str:
        """The config text; raises :class:`RenderError` naming the template line (also for a
        render longer than ``limit`` seconds or :data:`MAX_RENDER_BYTES`)."""
        _check_value(dict(context), "context")
        with self._lock:  # the environment times one render at a time
            try:
                text = self._env.bounded(self._template, context, limit)
            except jinja2.TemplateSyntaxError as exc:  # in an included template
                where = f"{exc.filename or self.template_path}:{exc.lineno}"
                raise RenderError(f"template {where}: syntax error: {exc.message}") from None
            except RenderError as exc:
                raise RenderError(f"template {self._where(exc)}: {exc}") from None
            except SecurityError as exc:
                raise RenderError(f"template {self._where(exc)}: refused by the sandbox: "
                                  f"{str(exc)[:200]}") from None
            except jinja2.UndefinedError as exc:
                raise RenderError(f"template {self._where(exc)}: undefined: "
                                  f"{exc.message}") from None
            except (RecursionError, MemoryError) as exc:  # an included template nested too deep
                raise RenderError(f"template {self.template_path}: too deeply nested to render "
                                  f"({type(exc).__name__})") from None
            except Exception as exc:  # anything a template expression can raise
                raise RenderError(f"template {self._where(exc)}: {type(exc).__name__}: "
                                  f"{exc}") from None
        if _SAFE_TEXT.fullmatch(text):
            return text
        for n, line in enumerate(text.split("\n"), 1):
            reason = _control_reason(line, allowed="\t")
            if reason:
                raise RenderError(f"template {self.template_path}: rendered line {n}: {reason}")
        return text

    def _where(self, exc: BaseException) -> str:
        """``file:line`` of the innermost template frame of ``exc``'s traceback."""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if not frame.filename.endswith(".py"):
                return f"{frame.filename}:{frame.lineno}"
        return str(self.template_path)


def render_config(
    config: WatcherConfig,
    slots: Mapping[str, Sequence[Slot]],
    paths: RuntimePaths,
    renderer: Renderer | None = None,
) -> str:
    """Shorthand: :func:`build_context` then :meth:`Renderer.render`."""
    return (renderer or Renderer(config.template)).render(build_context(config, slots, paths))
