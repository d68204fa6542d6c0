"""One HTTP API request as the API sees it, and its query parameters: parsed strictly
(unknown, repeated or malformed parameters are a 400 naming the parameter)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from discovery.errors import DiscoveryError, ValidationError
from discovery.lookup.http_guard import ascii_int
from discovery.model import validate as v
from discovery.model.durations import parse_duration

MAX_WAIT = 300.0  # longer waits are capped, as Consul caps at 10 minutes
#: Go's time.ParseDuration spelling of several parts, as Consul reads ``wait`` (1m30s, 5m0s)
_GO_DURATION = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{1,6})?(?:ns|us|µs|ms|s|m|h)){1,7}")
_GO_PART = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
TRUE, FALSE = {"", "1", "true", "yes"}, {"0", "false", "no"}
MAX_PARAMS = 32


class ApiError(DiscoveryError):
    """Answered as ``{"error": message, "param": param}`` with ``status`` and ``headers``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Request:
    """One request as the API sees it (the handler fills it in from the socket)."""

    target: str
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    client: str = "127.0.0.1"  # the peer's address: blocking queries are capped per client
    gone: Callable[[], bool] = field(default=_never)  # True once the client has hung up


@dataclass
class Response:
    """What the handler sends: status, body, content type, extra headers."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def parse_query(query: str) -> dict[str, list[str]]:
    """``a=1&b&a=2`` → ``{"a": ["1", "2"], "b": [""]}``; over MAX_PARAMS is a 400."""
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=MAX_PARAMS)
    except ValueError:
        raise ApiError(400, f"more than {MAX_PARAMS} query parameters") from None


def allow(query: dict[str, list[str]], allowed: set[str]) -> None:
    """Only ``allowed`` parameters, each once (``tag`` may repeat)."""
    for key, values in query.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, f"unknown parameter {key[:40]!r} (known: {known})", key[:40])
        if len(values) > 1 and key != "tag":
            raise ApiError(400, f"parameter {key!r} given {len(values)} times", key)


def flag(query: dict[str, list[str]], key: str) -> bool:
    """A boolean parameter; absent is False, ``?key`` alone is True."""
    value = query[key][0].strip().lower() if key in query else "0"
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise ApiError(400, f"{key}: {value[:20]!r} is not a boolean (1|0|true|false)", key)


def up_only(query: dict[str, list[str]]) -> bool:
    """``up`` or its Consul name ``passing``: each read, so a bad value of either is a 400."""
    up, passing = flag(query, "up"), flag(query, "passing")
    return up or passing


def filters(service: str | None, query: dict[str, list[str]]) -> list[str]:
    """The ``tag`` values of ``query``, once they and ``service`` (None: not given) are valid:
    else a 400 naming which (a name nothing can match would answer an empty list, which
    Prometheus takes for "every target is gone")."""
    tags = query.get("tag", [])
    for key, check in (("service", lambda: service is None or v.dns_label("service", service)),
                       ("tag", lambda: v.tags("tag", tags))):
        try:
            check()
        except ValidationError as exc:
            raise ApiError(400, str(exc), key) from None
    return tags


def blocking_params(query: dict[str, list[str]]) -> tuple[int | None, float]:
    """``?index=N&wait=D`` → (N or None, seconds capped at MAX_WAIT; default MAX_WAIT)."""
    index: int | None = None
    if "index" in query:
        raw = query["index"][0]
        index = ascii_int(raw)
        if index is None:
            raise ApiError(400, f"index: {raw.strip()[:20]!r} is not a non-negative integer in "
                                "ASCII digits (the X-Discovery-Index of an earlier answer)",
                           "index")
    wait = MAX_WAIT
    if "wait" in query:
        raw = query["wait"][0]
        try:
            wait = parse_duration("wait", raw, maximum=1e12)
        except ValidationError as exc:
            if not _GO_DURATION.fullmatch(raw):
                raise ApiError(400, str(exc), "wait") from None
            wait = sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART.findall(raw))
    return index, min(wait, MAX_WAIT)


