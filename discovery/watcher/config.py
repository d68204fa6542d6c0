"""Watcher settings: which services get a local HAProxy listener, and how.

Read from ``--service NAME:[BIND:]PORT`` flags and a TOML file (``[watcher]`` plus one
``[services.<name>]`` table per service). Every operator-given token that ends up in the
HAProxy config is checked against a keyword whitelist and a safe-token pattern here, so a
config file cannot smuggle a directive into HAProxy; errors are :class:`ConfigError`
naming the exact TOML key (``services.web.server_options``).
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from discovery.errors import ConfigError, ValidationError
from discovery.model import Instance, validate
from discovery.model.durations import parse_duration, to_ms
from discovery.watcher.guard import GuardSettings
from discovery.watcher.options import CHECK_KEYWORDS as CHECK_KEYWORDS
from discovery.watcher.options import SERVER_KEYWORDS as SERVER_KEYWORDS
from discovery.watcher.options import config_errors as _config_errors
from discovery.watcher.options import fail as _fail
from discovery.watcher.options import key_name as _key
from discovery.watcher.options import keywords as _keywords
from discovery.watcher.options import parse_options as parse_options
from discovery.watcher.options import show as _show
from discovery.watcher.outlier import OutlierSettings

MODES = ("http", "tcp")
# Only dynamic algorithms: the watcher changes weights at runtime, which HAProxy refuses
# for static ones (static-rr, map-based hashing). Hashing ones render `hash-type consistent`.
BALANCE = ("roundrobin", "leastconn", "first", "random", "source", "uri")
HASH_BALANCE = frozenset({"source", "uri"})
HTTP_ONLY_BALANCE = frozenset({"uri"})
ZONED_OUTLIER = OutlierSettings()  # a service routed by zone without check: outlier_in
FRONTEND_TIMEOUTS = ("client", "client-fin", "http-request", "http-keep-alive")
BACKEND_TIMEOUTS = ("connect", "server", "server-fin", "queue", "tunnel", "check")
TIMEOUTS = FRONTEND_TIMEOUTS + BACKEND_TIMEOUTS
DEFAULT_TIMEOUTS: Mapping[str, int] = {"connect": 5000, "client": 60000, "server": 60000}
MAX_TIMEOUT = 86400.0  # seconds
MAX_OPTION_WORDS = 50  # + "server sN ADDR weight W disabled check" <= HAProxy's 64 words
DEFAULT_BIND = "127.0.0.1"

_HTTPCHK_PATH = re.compile(r"/[A-Za-z0-9._~!&()*+,;=:@%/?-]{0,254}")

def parse_timeouts(culprit: str, value: object) -> dict[str, int]:
    """``{connect = "5s", http_request = 10000}`` -> ``{"connect": 5000, ...}`` (ms)."""
    if not isinstance(value, Mapping):
        _fail(culprit, 'must be a table of timeouts, e.g. { connect = "5s" }')
    out: dict[str, int] = {}
    for key, raw in value.items():
        where = f"{culprit}.{_key(key)}"
        name = str(key).replace("_", "-")
        if name not in TIMEOUTS:
            _fail(where, f"unknown timeout (allowed: {', '.join(TIMEOUTS)})")
        if isinstance(raw, float) and not math.isfinite(raw):  # (TOML nan, inf)
            _fail(where, "must be a finite number of milliseconds or a duration")
        if isinstance(raw, int | float) and not isinstance(raw, bool) and raw == int(raw):
            raw = int(raw)  # TOML numbers are milliseconds, as in HAProxy
        with _config_errors():
            seconds = parse_duration(where, raw, default_unit="ms", maximum=MAX_TIMEOUT)
        if seconds <= 0:
            _fail(where, "must be more than 0")
        out[name] = to_ms(seconds)
    return {k: out[k] for k in TIMEOUTS if k in out}


def _int_in(culprit: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(culprit, f"{_show(value)} is not a whole number in {lo}..{hi}")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    """One local listener: ``bind:port`` -> backend ``name`` (the registry service)."""

    name: str
    port: int
    bind: str = DEFAULT_BIND
    mode: str = "http"
    balance: str = "roundrobin"
    server_options: tuple[str, ...] = ()
    check: bool = False
    check_options: tuple[str, ...] = ()
    httpchk: str | None = None
    timeouts: Mapping[str, int] = field(default_factory=dict)  # ms
    tags: tuple[str, ...] = ()
    slots: int | None = None
    maxconn: int | None = None
    #: TOML: a table (or true / false); None (not set): on by default where routed by zone
    #: without ``check`` (router.py); False: off even there
    outlier: OutlierSettings | bool | None = None
    zone_min_up: int = 1  # local-zone up instances below which traffic spills over


    def __post_init__(self) -> None:
        """Validate, and normalise: options to token tuples, timeouts to ms, tags sorted."""
        at, put = f"services.{self.name}", partial(object.__setattr__, self)
        with _config_errors():
            validate.dns_label("services.<name>", self.name)
            put("bind", validate.bind_address(f"{at}.bind", str(self.bind)))
            if isinstance(self.tags, str) or not all(isinstance(t, str) for t in self.tags):
                raise ValidationError(f"{at}.tags", "must be a list of tags")
            put("tags", validate.tags(f"{at}.tags", list(self.tags)))
        _int_in(f"{at}.port", self.port, 1, 65535)
        if self.mode not in MODES:
            _fail(f"{at}.mode", f"{_show(self.mode)} is not one of {', '.join(MODES)}")
        if self.balance not in BALANCE:
            _fail(f"{at}.balance", f"{_show(self.balance)} is not one of {', '.join(BALANCE)}")
        if self.balance in HTTP_ONLY_BALANCE and self.mode != "http":
            _fail(f"{at}.balance", f'{self.balance!r} needs mode = "http"')
        put("server_options", parse_options(f"{at}.server_options", self.server_options))
        put("check_options", parse_options(f"{at}.check_options", self.check_options, True))
        both = set(_keywords(self.server_options)) & set(_keywords(self.check_options))
        if both:
            _fail(f"{at}.check_options", f"{sorted(both)[0]!r} is also in server_options")
        if len(self.server_options) + len(self.check_options) > MAX_OPTION_WORDS:
            _fail(f"{at}.server_options", f"more than {MAX_OPTION_WORDS} words with check_options "
                  "(HAProxy reads at most 64 per line)")  # fmt: skip
        if not isinstance(self.check, bool):
            _fail(f"{at}.check", "must be true or false")
        if self.httpchk is not None and not _HTTPCHK_PATH.fullmatch(str(self.httpchk)):
            _fail(f"{at}.httpchk", f"{_show(self.httpchk)} is not a path like /health")
        for key in ("check_options", "httpchk"):
            if getattr(self, key) and not self.check:
                _fail(f"{at}.{key}", "needs check = true")
        put("timeouts", parse_timeouts(f"{at}.timeouts", self.timeouts))
        if self.slots is not None:
            _int_in(f"{at}.slots", self.slots, 1, 4096)
        if self.maxconn is not None:
            _int_in(f"{at}.maxconn", self.maxconn, 1, 1000000)
        if self.outlier is not None and self.outlier is not False and not isinstance(
                self.outlier, OutlierSettings):
            put("outlier", OutlierSettings.parse(f"{at}.outlier", self.outlier))
        if self.outlier not in (None, False) and self.mode != "http":  # no success ends a run
            _fail(f"{at}.outlier", 'needs mode = "http" (HAProxy counts no responses in TCP '
                  "mode: rare errors would eject a healthy instance; use check = true)")
        _int_in(f"{at}.zone_min_up", self.zone_min_up, 1, 100000)

    def outlier_in(self, zone: str | None) -> OutlierSettings | None:
        """The outlier ejection in force; an HTTP service routed by ``zone`` without ``check``:
        the defaults, unless ``outlier = false``. There a local instance nothing answers on
        (one record's address, which every host of the zone reads) held the other zones at
        weight 0, and every host of the zone answered 503 for the service; now its errors
        eject it and the zone spills over. Not in TCP mode: HAProxy counts no responses there,
        so no success would ever end a run of rare errors (``check`` is the way there)."""
        if isinstance(self.outlier, OutlierSettings):
            return self.outlier
        return (ZONED_OUTLIER if self.outlier is None and zone and not self.check
                and self.mode == "http" else None)

    def accepts(self, instance: Instance) -> bool:
        """Whether ``instance`` belongs in this listener's backend (tag filter)."""
        return instance.service == self.name and set(self.tags) <= set(instance.tags)


@dataclass(frozen=True)
class WatcherConfig:
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    maxconn: int = 4096
    timeouts: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    stats_port: int | None = None
    wait_min: float = 0.02  # a runtime change costs ~5 ms at any size: a short window is cheap
    wait_max: float = 0.5
    reload_min_interval: float = 1.0
    template: str | None = None
    guard: GuardSettings = field(default_factory=GuardSettings)
    zone: str = ""  # this watcher's zone: route there first ("": no zone routing)

    def ports(self) -> set[int]:
        """The ports HAProxy listens on: the stats page's and every service's."""
        return {port for _, port, _ in listeners(self)}

    def __post_init__(self) -> None:
        if not isinstance(self.zone, str):
            _fail("watcher.zone", f"{_show(self.zone)} is not a zone name (a DNS label)")
        if self.zone:
            with _config_errors():
                validate.dns_label("watcher.zone", self.zone)
        for name, svc in self.services.items():
            if not isinstance(svc, ServiceConfig) or svc.name != name:
                _fail(f"services.{_key(name)}", "key and service name differ")
        _int_in("watcher.maxconn", self.maxconn, 1, 1000000)
        object.__setattr__(self, "timeouts", parse_timeouts("watcher.timeouts", self.timeouts))
        if self.stats_port is not None:
            _int_in("watcher.stats_port", self.stats_port, 1, 65535)
        if not all(isinstance(x, int | float) for x in (self.wait_min, self.wait_max)):
            _fail("watcher.wait", "min and max must be numbers of seconds")
        if not 0 <= self.wait_min <= self.wait_max <= 600 or self.wait_max <= 0:
            _fail("watcher.wait", "needs 0 <= min <= max <= 10m and max > 0")
        if not isinstance(self.reload_min_interval, int | float) or not (
            0 <= self.reload_min_interval <= 3600
        ):
            _fail("watcher.reload_min_interval", "must be between 0s and 1h")
        if self.template is not None and not isinstance(self.template, str):
            _fail("watcher.template", "must be a file path")
        _check_ports(self)


def listeners(cfg: WatcherConfig) -> list[tuple[str, int, str]]:
    """HAProxy's listeners of ``cfg``: ``(bind, port, the key that sets it)``."""
    used: list[tuple[str, int, str]] = []
    if cfg.stats_port is not None:
        used.append((DEFAULT_BIND, cfg.stats_port, "watcher.stats_port"))
    for name in sorted(cfg.services):
        svc = cfg.services[name]
        used.append((svc.bind, svc.port, f"services.{name}.port"))
    return used


def _check_ports(cfg: WatcherConfig) -> None:
    """No two listeners on the same address and port (a wildcard bind clashes with all)."""
    used = listeners(cfg)
    wild = {bind for bind, _, _ in used if ipaddress.ip_address(bind).is_unspecified}
    for n, (bind, port, key) in enumerate(used):
        for other_bind, other_port, other_key in used[:n]:
            if port == other_port and (bind == other_bind or {bind, other_bind} & wild):
                _fail(key, f"{bind}:{port} is already used by {other_key.rsplit('.', 1)[0]}")


def parse_wait(value: str, culprit: str = "--wait") -> tuple[float, float]:
    """``"50ms:500ms"`` -> ``(0.05, 0.5)``; ``"1s"`` -> ``(1.0, 4.0)`` (max = 4 x min)."""
    if not isinstance(value, str):
        _fail(culprit, 'must be a string like "50ms:500ms"')
    parts = value.split(":")
    if len(parts) > 2:
        _fail(culprit, f"{_show(value)} is not MIN or MIN:MAX, e.g. 50ms:500ms")
    with _config_errors():
        low = parse_duration(culprit, parts[0], maximum=600)
        high = parse_duration(culprit, parts[1], maximum=600) if len(parts) == 2 else 4 * low
    if high < low or high <= 0:
        _fail(culprit, f"{_show(value)}: max must be more than 0 and at least min")
    return low, high


def parse_service_arg(value: str, culprit: str | None = None) -> ServiceConfig:
    """``"web:18000"`` or ``"web:127.0.0.2:18000"`` (IPv6: ``"web:[::1]:18000"``)."""
    return _service_arg(value, culprit)[0]


def _service_arg(value: str, culprit: str | None = None) -> tuple[ServiceConfig, bool]:
    """:func:`parse_service_arg`, and whether ``value`` names a bind address."""
    where = culprit or f"--service {_show(value)}"
    m = re.fullmatch(r"([^:]+)(?::(\[[^]]*\]|[^:]*))?:([^:]+)", value) if len(value) < 300 else None
    if m is None:
        _fail(where, "expected NAME:PORT or NAME:BIND:PORT")
    name, bind, port = m[1], (m[2] or DEFAULT_BIND).strip("[]"), m[3]
    with _config_errors():
        validate.dns_label(where, name)
        bind = validate.bind_address(where, bind)
        port_number = validate.port(where, port)
    return ServiceConfig(name=name, port=port_number, bind=bind), bool(m[2])


_SERVICE_KEYS = {f.name for f in fields(ServiceConfig)} - {"name"}
_WATCHER_KEYS = {"maxconn", "timeouts", "stats_port", "wait", "reload_min_interval", "template",
                 "wipe_guard", "zone"}


def _service_from_table(name: str, table: object) -> ServiceConfig:
    with _config_errors():
        validate.dns_label("services.<name>", name)
    at = f"services.{name}"
    if not isinstance(table, dict):
        _fail(at, "must be a table")
    unknown = sorted(map(_key, set(table) - _SERVICE_KEYS))
    if unknown:
        _fail(f"{at}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_SERVICE_KEYS))})")
    if "port" not in table:
        _fail(f"{at}.port", "missing: the local port to listen on")
    return ServiceConfig(name=name, **table)


def watcher_config_from_dict(data: Mapping[str, Any]) -> WatcherConfig:
    """Build from parsed TOML: the ``[watcher]`` and ``[services.*]`` tables (others ignored)."""
    table = data.get("watcher", {})
    if not isinstance(table, dict):
        _fail("watcher", "must be a table")
    unknown = sorted(map(_key, set(table) - _WATCHER_KEYS))
    if unknown:
        _fail(f"watcher.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_WATCHER_KEYS))})")
    values: dict[str, Any] = {
        k: table[k] for k in ("maxconn", "stats_port", "template", "zone") if k in table
    }
    if "timeouts" in table:
        values["timeouts"] = {
            **DEFAULT_TIMEOUTS,
            **parse_timeouts("watcher.timeouts", table["timeouts"]),
        }
    if "wait" in table:
        values["wait_min"], values["wait_max"] = parse_wait(table["wait"], "watcher.wait")
    if "wipe_guard" in table:
        values["guard"] = GuardSettings.parse(table["wipe_guard"])
    if "reload_min_interval" in table:
        with _config_errors():
            values["reload_min_interval"] = parse_duration(
                "watcher.reload_min_interval", table["reload_min_interval"], maximum=3600
            )
    services = data.get("services", {})
    if not isinstance(services, dict):
        _fail("services", "must be a table of [services.<name>] tables")
    values["services"] = {n: _service_from_table(n, t) for n, t in sorted(services.items())}
    return WatcherConfig(**values)


def load_watcher_config(path: str | Path) -> WatcherConfig:
    """Read a TOML file; raises :class:`ConfigError` naming the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    try:
        return watcher_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def merge(file_cfg: WatcherConfig, cli_services: Sequence[str]) -> WatcherConfig:
    """Add the ``--service`` listeners (``NAME[:BIND]:PORT``) to the file's. For a service the
    file also defines, the flag sets the port (and the bind address, when it names one, even
    the default's); the rest comes from the file."""
    services = dict(file_cfg.services)
    given: set[str] = set()
    for arg in cli_services:
        svc, bind_given = _service_arg(arg)
        if svc.name in given:
            _fail(f"--service {svc.name}", "given twice")
        given.add(svc.name)
        base = services.get(svc.name)
        if base is None:
            services[svc.name] = svc
        else:
            bind = svc.bind if bind_given else base.bind
            services[svc.name] = replace(base, port=svc.port, bind=bind)
    return replace(file_cfg, services=dict(sorted(services.items())))
