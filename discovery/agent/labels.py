"""Container labels and env vars -> the :class:`ServiceSpec` list the agent registers.

Two conventions are read. Ours, as labels: ``discovery.service``, ``discovery.port``,
``discovery.tags``, ``discovery.weight``, ``discovery.meta.<key>``, ``discovery.ignore``,
``discovery.check[.<param>]``, ``discovery.warmup.<field>``, each also as
``discovery.<port>.<...>`` for one port of a multi-port container. Registrator's, as labels
or env vars: ``SERVICE_NAME``, ``SERVICE_TAGS``, ``SERVICE_WEIGHT``, ``SERVICE_IGNORE``,
``SERVICE_<KEY>`` (meta) and their ``SERVICE_<port>_<...>`` forms.

Both are folded into one table of canonical keys (``service``, ``80.tags``,
``meta.region``, ``check.path`` ...); later sources overwrite earlier ones:
env ``SERVICE_*`` < label ``SERVICE_*`` < label ``discovery.*``. A value is then looked up
per port first (``80.tags``), container-wide second (``tags``).

Anything unusable raises :class:`LabelError` naming the container and the label.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from discovery.agent import warmup
from discovery.agent.checks import CHECK_TYPES, parse_command, status_matcher
from discovery.agent.spec import (
    CheckSpec,
    ServiceSpec,
    label_count,
    label_duration,
    within_limits,
)
from discovery.errors import CheckError, LabelError, ValidationError
from discovery.model import validate

log = logging.getLogger(__name__)

PREFIX = "discovery."
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}
_DISCOVERY_KEY = re.compile(r"(?:([0-9]+)\.)?([a-z]+)(?:\.(.+))?", re.S)
_REGISTRATOR_KEY = re.compile(r"SERVICE_(?:([0-9]+)_)?(.+)", re.S)
_REGISTRATOR_FIELDS = {"NAME": "service", "TAGS": "tags", "WEIGHT": "weight", "IGNORE": "ignore"}
_PLAIN = {"service", "tags", "weight", "ignore", "check", "zone"}  # discovery.[<port>.]<name>
_PORT_SERVICE = re.compile(r"([0-9]+)\.service")  # canonical key naming one port's service

Entry = tuple[str, str]  # (value, culprit)


def parse_container(
    attrs: dict[str, Any],
    *,
    advertise: str = "127.0.0.1",
    internal: bool = False,
    defaults: CheckSpec | None = None,
) -> list[ServiceSpec]:
    """The services container ``attrs`` (Docker's inspect dict) asks to register.

    ``[]`` when it asks for none or is ignored. ``advertise`` is this host's address,
    used for published ports and host-network containers; ``internal`` registers the
    container's own IP and port instead. ``defaults`` supplies check settings that no
    label overrides. Raises :class:`LabelError`.
    """
    advertise = validate.address("advertise address", advertise)
    who = _who(attrs)
    try:
        return _parse(attrs, who, advertise, internal, defaults or CheckSpec())
    except LabelError:
        raise
    except ValidationError as exc:
        raise LabelError(exc.culprit, exc.reason) from None


def _who(attrs: dict[str, Any]) -> str:
    name = _show(str(attrs.get("Name") or "?").lstrip("/"))
    return f"container {name} ({_show(str(attrs.get('Id') or '?')[:12])})"


def _show(text: str) -> str:
    """``text`` if it is safe to print in an error message, else a clipped repr."""
    if len(text) <= 100 and text.isprintable():
        return text
    return repr(text[:60]) + ("..." if len(text) > 60 else "")


def _collect(attrs: dict[str, Any], who: str) -> tuple[dict[str, Entry], list[LabelError], bool]:
    """Fold env vars and labels into canonical keys. Bad keys and values become problems,
    raised only if the container asks for a service at all (the third value)."""
    config = attrs.get("Config") or {}
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    env = dict(str(e).split("=", 1) for e in config.get("Env") or [] if "=" in str(e))
    sources = [
        ("env", {k: v for k, v in env.items() if k.startswith("SERVICE_")}),
        ("label", {k: v for k, v in labels.items() if k.startswith("SERVICE_")}),
        ("label", {k: v for k, v in labels.items() if k.startswith(PREFIX)}),
    ]
    table: dict[str, Entry] = {}
    problems: list[LabelError] = []
    asked = False
    for origin, items in sources:
        mine: dict[str, str] = {}  # canonical key -> the key of this source that gave it
        for key, value in sorted(items.items()):  # (of two that mean the same: the first)
            culprit = f"{who} {origin} {_show(key)}"
            try:
                validate.text(culprit, key)
                canon = _canonical(key, culprit)
                if canon is None:
                    continue
                asked = asked or canon == "service" or bool(_PORT_SERVICE.fullmatch(canon))
                if canon.split(".")[0].isdigit():
                    validate.port(culprit, canon.split(".")[0])
                validate.text(culprit, value)
                if (twin := mine.setdefault(canon, key)) != key:  # SERVICE_REGION, SERVICE_Region
                    log.warning("%s: ignored: means the same as %s %s, whose value is taken "
                                "(keys differing in case or a port's leading zeros): keep one",
                                culprit, origin, _show(twin))
                    continue
                table[canon] = (value, culprit)
            except LabelError as exc:
                problems.append(exc)
            except ValidationError as exc:
                problems.append(LabelError(exc.culprit, exc.reason))
    return table, problems, asked


def _canonical(key: str, culprit: str) -> str | None:
    """``discovery.80.check.path`` -> ``80.check.path``, ``SERVICE_80_NAME`` -> ``80.service``,
    ``SERVICE_REGION`` -> ``meta.region``; ``None`` for keys we deliberately skip."""
    if key.startswith(PREFIX):
        m = _DISCOVERY_KEY.fullmatch(key[len(PREFIX) :])
        if m is None or not (
            (m[2] in _PLAIN and m[3] is None)
            or (m[2] == "port" and m[1] is None and m[3] is None)
            or (m[2] in ("check", "meta") and m[3] is not None)
            or (m[2] == "warmup" and m[3] in warmup.FIELDS)
        ):
            raise LabelError(culprit, "unknown label (see the label reference)")
        port, rest = m[1], key[len(PREFIX) + (len(m[1]) + 1 if m[1] else 0) :]
    else:
        m = _REGISTRATOR_KEY.fullmatch(key)
        if m is None or m[2] == "ID" or m[2].startswith("CHECK_"):
            return None  # registrator's own instance id and its Consul check settings
        port, rest = m[1], _REGISTRATOR_FIELDS.get(m[2]) or f"meta.{m[2].lower()}"
    return f"{int(port)}.{rest}" if port else rest


def _parse(
    attrs: dict[str, Any], who: str, advertise: str, internal: bool, defaults: CheckSpec
) -> list[ServiceSpec]:
    table, problems, asked = _collect(attrs, who)
    if not asked:
        return []
    if _flag(table, "ignore"):
        log.debug("%s: ignored", who)
        return []
    if problems:
        raise problems[0]

    tcp, udp = _ports(attrs)
    wanted: dict[int, tuple[Entry, str]] = {}  # port -> ((name, culprit), port culprit)
    for key, entry in table.items():
        if m := _PORT_SERVICE.fullmatch(key):
            wanted[int(m[1])] = (entry, entry[1])
    if "service" in table:
        if "port" in table:
            value, culprit = table["port"]
            wanted.setdefault(_number(validate.port, culprit, value), (table["service"], culprit))
        elif len(tcp) == 1:
            wanted.setdefault(next(iter(tcp)), (table["service"], f"{who} label discovery.port"))
        elif not wanted:
            found = ", ".join(f"{p}/tcp" for p in sorted(tcp)) or "none"
            raise LabelError(
                f"{who} label discovery.port",
                f"not set, and the container does not expose exactly one TCP port ({found})",
            )

    specs, scopes = [], _scopes(table)
    for cport, ((name, name_culprit), port_culprit) in sorted(wanted.items()):
        if _flag(table, f"{cport}.ignore"):
            continue

        def get(field: str, cport: int = cport) -> Entry | None:
            return table.get(f"{cport}.{field}") or table.get(field)

        address, port = _address(attrs, cport, port_culprit, tcp, udp, advertise, internal)
        tags, weight, zone = get("tags"), get("weight"), get("zone")
        specs.append(
            ServiceSpec(
                service=validate.dns_label(name_culprit, name),
                container_port=cport,
                address=address,
                port=port,
                tags=validate.tags(tags[1], _split(tags[0])) if tags else (),
                weight=_number(validate.weight, weight[1], weight[0]) if weight else 100,
                meta=validate.meta(f"{who} meta", _prefixed(scopes, cport, "meta.")),
                check=_check(scopes, cport, get, who, _has_healthcheck(attrs), defaults),
                zone=validate.dns_label(zone[1], zone[0]) if zone else "",
                warmup=warmup.parse({f: e for f in warmup.FIELDS if (e := get(f"warmup.{f}"))}),
            )
        )
    return specs


def _flag(table: dict[str, Entry], key: str) -> bool:
    if key not in table:
        return False
    value, culprit = table[key]
    if value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise LabelError(culprit, f"{value[:32]!r} is not true or false")


def _number(check: Callable[[str, str], int], culprit: str, value: str) -> int:
    """``validate.port`` / ``validate.weight``, minus the non-ASCII digits ``int()`` trips on."""
    if not value.strip().isascii():
        raise LabelError(culprit, f"{value[:32]!r} is not a number")
    return check(culprit, value)


def _split(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


Scopes = dict[str, list[tuple[str, Entry]]]  # "80.meta." -> [("region", entry), ...]


def _scopes(table: dict[str, Entry]) -> Scopes:
    """The table's entries by scope (``meta.``, ``80.check.``), each with the rest of its key:
    read once, so that a container of hundreds of ports does not read every label for each."""
    out: Scopes = {}
    for key, entry in table.items():
        head, _, rest = key.partition(".")
        if head.isdigit():
            name, _, rest = rest.partition(".")
            head = f"{head}.{name}"
        if rest:
            out.setdefault(f"{head}.", []).append((rest, entry))
    return out


def _prefixed(scopes: Scopes, cport: int, prefix: str) -> dict[str, str]:
    """``meta.*`` / ``check.*`` entries, per-port ones overriding container-wide ones;
    keys and values validated like meta."""
    out: dict[str, str] = {}
    for scope in (prefix, f"{cport}.{prefix}"):
        for key, (value, culprit) in scopes.get(scope, ()):
            try:
                out.update(validate.meta(culprit, {key: value}))
            except ValidationError as exc:
                raise LabelError(culprit, exc.reason) from None
    return out


def _ports(attrs: dict[str, Any]) -> tuple[set[int], set[int]]:
    """TCP and UDP container ports the container exposes or publishes."""
    keys: list[str] = []
    for section, name in (
        ("Config", "ExposedPorts"),
        ("HostConfig", "PortBindings"),
        ("NetworkSettings", "Ports"),
    ):
        keys.extend(str(k) for k in ((attrs.get(section) or {}).get(name) or {}))
    tcp: set[int] = set()
    udp: set[int] = set()
    for key in keys:
        number, _, proto = key.partition("/")
        if number.isascii() and number.isdigit() and 1 <= int(number) <= 65535:
            {"tcp": tcp, "": tcp, "udp": udp}.get(proto, set()).add(int(number))
    return tcp, udp


def _address(
    attrs: dict[str, Any],
    cport: int,
    culprit: str,
    tcp: set[int],
    udp: set[int],
    advertise: str,
    internal: bool,
) -> tuple[str, int]:
    host_net = (attrs.get("HostConfig") or {}).get("NetworkMode") == "host"
    if cport not in tcp:
        if cport in udp:
            raise LabelError(culprit, f"port {cport} is UDP only; only TCP can be registered")
        if not host_net:  # on the host network any port is reachable, EXPOSEd or not
            raise LabelError(culprit, f"port {cport}/tcp is neither exposed nor published")
    if host_net:
        return advertise, cport
    net = attrs.get("NetworkSettings") or {}
    if internal:  # an IPv4 address if it has one, else a global IPv6 one
        nets = [net, *(n for n in (net.get("Networks") or {}).values() if isinstance(n, dict))]
        ips = [n.get(field) for field in ("IPAddress", "GlobalIPv6Address") for n in nets]
        ip = next((i for i in ips if i), None)
        if not ip:
            raise LabelError(culprit, "container has no IP address to register (internal)")
        return validate.address(culprit, str(ip)), cport
    host_config = attrs.get("HostConfig") or {}
    bindings = [  # actual bindings (running container) first, then the requested ones
        b
        for b in [
            *((net.get("Ports") or {}).get(f"{cport}/tcp") or []),
            *((host_config.get("PortBindings") or {}).get(f"{cport}/tcp") or []),
        ]
        if isinstance(b, dict) and str(b.get("HostPort") or "0") != "0"
    ]
    if not bindings:
        raise LabelError(
            culprit,
            f"port {cport}/tcp is not published on the host "
            "(publish it with -p, or use internal addressing)",
        )
    for b in bindings:  # prefer a binding reachable at the advertised address
        if str(b.get("HostIp") or "") in ("", "0.0.0.0", "::", advertise):
            return advertise, _number(validate.port, culprit, str(b["HostPort"]))
    host_ip, host_port = str(bindings[0]["HostIp"]), str(bindings[0]["HostPort"])
    address = validate.address(culprit, host_ip)
    loopback = [ipaddress.ip_address(a).is_loopback for a in (address, advertise)]
    if loopback == [True, False]:
        raise LabelError(culprit, f"port {cport}/tcp is published on {address} only: other hosts "
                         f"cannot reach it (every host would send its traffic to its own "
                         f"loopback); publish it on {advertise} or 0.0.0.0")
    return address, _number(validate.port, culprit, host_port)


def _has_healthcheck(attrs: dict[str, Any]) -> bool:
    test = ((attrs.get("Config") or {}).get("Healthcheck") or {}).get("Test") or []
    return bool(test) and list(test) != ["NONE"]


def _check(
    scopes: Scopes,
    cport: int,
    get: Callable[[str], Entry | None],
    who: str,
    healthcheck: bool,
    defaults: CheckSpec,
) -> CheckSpec:
    entry = get("check")
    ctype, culprit = defaults.type, f"{who} label discovery.check"
    if entry:
        ctype, culprit = entry[0].strip(), entry[1]
        known = CHECK_TYPES()
        if ctype not in known:
            raise LabelError(
                culprit, f"unknown check type {ctype[:32]!r} (known: {', '.join(sorted(known))})"
            )
        if ctype == "docker" and not healthcheck:
            raise LabelError(culprit, "check type docker, but the image has no HEALTHCHECK")
    elif healthcheck:
        ctype = "docker"
    elif ctype == "docker":  # (it had no runner: never healthy, never registered, no word)
        raise LabelError(culprit, "the default check type ([agent.check] type) is docker, but "
                         "the image has no HEALTHCHECK: give it a discovery.check label")
    params = dict(defaults.params) if ctype == defaults.type else {}
    params.update(_prefixed(scopes, cport, "check."))

    def where(param: str) -> str:
        return (get(f"check.{param}") or ("", culprit))[1]

    fields: dict[str, Any] = {}
    for name in ("interval", "timeout"):
        if name in params:
            fields[name] = label_duration(where(name), params.pop(name))
    for name in ("rise", "fall"):
        if name in params:
            fields[name] = label_count(where(name), params.pop(name))
    try:
        if ctype == "http":
            path = params["path"] = params.get("path") or "/"
            if not path.startswith("/") or not all(33 <= ord(c) < 127 for c in path):
                raise LabelError(where("path"), "HTTP path must start with / and be printable "
                                 "ASCII without spaces")  # http.client sends ASCII only
            try:
                status_matcher(params.get("status"))
            except CheckError as exc:
                raise LabelError(where("status"), str(exc)) from None
        elif ctype == "exec":
            argv = parse_command(params.get("command"))
            for arg in argv:
                validate.text(where("command"), arg)
            params["command"] = json.dumps(argv)
    except CheckError as exc:
        raise LabelError(where("command"), str(exc)) from None

    def label(field: str) -> str:  # the label to change, even when a default broke the limit
        return (get(f"check.{field}") or ("", f"{who} label discovery.check.{field}"))[1]

    spec = replace(defaults, type=ctype, params=params, **fields)
    return within_limits(spec, label, timeout_given="timeout" in fields)
