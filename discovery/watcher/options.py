"""HAProxy keywords an operator may put on ``server`` lines (``server_options``,
``check_options``), and the error helpers every watcher-config module shares.

Each keyword has a value check; a value must also be one safe token, so a config file cannot
smuggle a directive into HAProxy. Errors are :class:`ConfigError` naming the exact TOML key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NoReturn

from discovery.errors import ConfigError, ValidationError

_SAFE_TOKEN = re.compile(r"-?[A-Za-z0-9/][A-Za-z0-9._:/,+=@-]{0,127}")

Check = Callable[[str], bool] | None  # None: a flag without a value


def _int(lo: int, hi: int) -> Check:
    return lambda s: bool(re.fullmatch(r"-?[0-9]{1,9}", s)) and lo <= int(s) <= hi


def _enum(*choices: str) -> Check:
    return choices.__contains__


def _match(pattern: str) -> Check:
    return lambda s: re.fullmatch(pattern, s) is not None


def _ip(s: str) -> bool:
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(s))
    return False


_MS = {"us": 0.001, "ms": 1, "": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_TIMER_MAX_MS = 2_147_483_647  # HAProxy refuses a longer timer ("timer overflow")


def _timer(minimum_ms: float) -> Check:
    """An HAProxy time (a bare number: milliseconds) of at least ``minimum_ms``."""
    def check(s: str) -> bool:
        m = re.fullmatch(r"([0-9]{1,12})(us|ms|s|m|h|d)?", s)
        return m is not None and minimum_ms <= int(m[1]) * _MS[m[2] or ""] <= _TIMER_MAX_MS

    return check


# a check interval of 0 is refused by HAProxy ("invalid value 0 for argument 'inter'")
_time, _interval = _timer(0), _timer(1)
_token = _match(_SAFE_TOKEN.pattern)
_PROTO = _enum("h1", "h2", "fcgi", "none")  # HAProxy 2.6's `proto` multiplexers
_TLS = ("SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
CHECK_KEYWORDS: Mapping[str, Check] = {
    "inter": _interval, "fastinter": _interval, "downinter": _interval,
    "rise": _int(1, 1000), "fall": _int(1, 1000), "port": _int(1, 65535), "addr": _ip,
    "check-ssl": None, "check-send-proxy": None, "check-alpn": _token, "check-proto": _PROTO,
    "check-sni": _token, "observe": _enum("layer4", "layer7"),
    "on-error": _enum("fastinter", "fail-check", "sudden-death", "mark-down"),
    "on-marked-down": _enum("shutdown-sessions"),
    "on-marked-up": _enum("shutdown-backup-sessions"), "error-limit": _int(1, 1000000),
}  # fmt: skip
_CHECK_ONLY = ("port", "addr", "check-ssl", "check-send-proxy", "check-alpn", "check-proto",
               "check-sni")  # fmt: skip
SERVER_KEYWORDS: Mapping[str, Check] = {
    **{k: c for k, c in CHECK_KEYWORDS.items() if k not in _CHECK_ONLY},
    "maxconn": _int(0, 1000000), "minconn": _int(0, 1000000), "maxqueue": _int(0, 1000000),
    "slowstart": _time, "backup": None, "send-proxy": None, "send-proxy-v2": None,
    "tfo": None, "ssl": None, "verify": _enum("none", "required"), "ca-file": _token,
    "alpn": _token, "proto": _PROTO, "ws": _enum("auto", "h1", "h2"),
    "ssl-min-ver": _enum(*_TLS), "ssl-max-ver": _enum(*_TLS), "no-ssl-reuse": None,
    "pool-max-conn": _int(-1, 1000000), "pool-low-conn": _int(0, 1000000),
    "pool-purge-delay": _time, "max-reuse": _int(-1, 1000000), "tcp-ut": _time,
}  # fmt: skip


def fail(culprit: str, reason: str) -> NoReturn:
    raise ConfigError(f"{culprit}: {reason}")


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Re-raise a :class:`ValidationError` as a :class:`ConfigError` naming the same key."""
    try:
        yield
    except ValidationError as exc:
        fail(exc.culprit, exc.reason)


def show(value: object) -> str:
    return repr(value)[:64]


def key_name(key: object) -> str:
    """A TOML key as it may appear in an error message."""
    return key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else show(key)


def parse_options(culprit: str, value: object, check_only: bool = False) -> tuple[str, ...]:
    """``"maxconn 100 inter 2s"`` (or a list of such strings) -> checked tokens: keywords
    from :data:`SERVER_KEYWORDS` (or :data:`CHECK_KEYWORDS` with ``check_only``)."""
    keywords = CHECK_KEYWORDS if check_only else SERVER_KEYWORDS
    if isinstance(value, str):
        raw = [value]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        raw = list(value)
    else:
        fail(culprit, 'must be a string of HAProxy keywords, e.g. "maxconn 100"')
    for ch in "".join(raw):
        if ch not in " \t" and not ch.isprintable():
            fail(culprit, f"control character {ord(ch):#04x} not allowed")
    tokens = [word for part in raw for word in part.split()]
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        word = tokens[i]
        if word not in keywords:
            allowed = ", ".join(sorted(keywords))
            fail(culprit, f"{show(word)} is not an allowed keyword here (allowed: {allowed})")
        if word in seen:
            fail(culprit, f"{word!r} given twice")
        seen.add(word)
        check = keywords[word]
        if check is not None:
            if i + 1 >= len(tokens):
                fail(culprit, f"{word!r} needs a value")
            arg = tokens[i + 1]
            if not _SAFE_TOKEN.fullmatch(arg) or not check(arg):
                fail(culprit, f"{show(arg)} is not a valid value for {word!r}")
            i += 1
        i += 1
    if "verify" in seen and tokens[tokens.index("verify") + 1] == "required" \
            and "ca-file" not in seen:
        fail(culprit, "'verify required' needs a 'ca-file' to verify with")
    return tuple(tokens)


def keywords(tokens: Sequence[str]) -> list[str]:
    """The keywords of already checked option tokens (skipping their values)."""
    out, i = [], 0
    while i < len(tokens):
        out.append(tokens[i])
        i += 1 if SERVER_KEYWORDS.get(tokens[i], CHECK_KEYWORDS.get(tokens[i])) is None else 2
    return out
