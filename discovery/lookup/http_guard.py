"""What the HTTP API refuses before it answers: foreign ``Host`` headers (DNS rebinding),
writes without the token, and values JSON cannot carry (the caps on connections and blocking
queries are :class:`discovery.lookup.peers.Slots`).

Pure helpers (no sockets), so that they are unit-tested directly; docs/security.md says why
each limit is what it is.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import stat
from collections.abc import Mapping
from typing import Any

from discovery.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Discovery-Token"
TOKEN_ENV = "DISCOVERY_HTTP_TOKEN_FILE"
TOKEN_FLAG = "--http-token-file"
MIN_TOKEN = 16  # characters: `openssl rand -hex 32` gives 64
HOW_TO_TOKEN = (f"start it with {TOKEN_FLAG} FILE (env {TOKEN_ENV}) and send the file's "
                f"contents as {TOKEN_HEADER}: TOKEN or Authorization: Bearer TOKEN "
                f"(discovery maint {TOKEN_FLAG} FILE does)")


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace ignored); ConfigError when it cannot be
    read or is not a usable token. Warns when other users may read the file."""
    culprit = f"{TOKEN_FLAG} {path!r} (or {TOKEN_ENV})"
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{culprit}: not a regular file")
            raw = fh.read(4097)
    except OSError as exc:
        raise ConfigError(f"{culprit}: cannot read it: {exc.strerror or exc}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{culprit}: the token must be printable ASCII") from None
    if len(raw) > 4096 or not token.isprintable() or " " in token:
        raise ConfigError(f"{culprit}: the token must be one word of printable ASCII, at most "
                          "4096 bytes")
    if len(token) < MIN_TOKEN:
        raise ConfigError(f"{culprit}: the token has {len(token)} characters, fewer than "
                          f"{MIN_TOKEN} (make one with: openssl rand -hex 32)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: the token file is readable by other users (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))
    return token


def host_allowed(host: str | None) -> bool:
    """True for a ``Host`` header naming an IP literal or ``localhost`` (with or without a
    port), or no Host at all (HTTP/1.0 tools; a browser always sends one). Anything else may
    be a DNS name rebound to us by a web page, and is refused."""
    if host is None:
        return True
    host = host.strip()
    if host.startswith("["):  # [IPv6]:port
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not _port(rest)):
            return False
        name = inside
    else:
        name, colon, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if colon and not _port(":" + port):
            return False
        if ":" in name:  # a bare IPv6 address is not a valid Host, but nothing rebinds it
            return _ip(name)
    return name.lower() == "localhost" or _ip(name)


def _port(text: str) -> bool:
    digits = text[1:]
    return text.startswith(":") and digits.isascii() and digits.isdigit() and len(digits) <= 5


def _ip(name: str) -> bool:
    if not name or not name.isascii() or "%" in name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token a request carries (``headers``: lower-case names), or None."""
    if TOKEN_HEADER.lower() in headers:
        return headers[TOKEN_HEADER.lower()].strip()
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison (the time does not depend on how much of it was right)."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"),
                               expected.encode("utf-8", "replace"))


def ascii_int(raw: str, max_digits: int = 18) -> int | None:
    """``raw`` as a non-negative integer written in ASCII digits, else None (``"²"`` and
    ``"٣"`` are digits to :meth:`str.isdigit`, not to :func:`int`)."""
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > max_digits:
        return None
    return int(raw)


def dump_json(data: Any, pretty: bool) -> bytes:
    """JSON that every parser reads: never NaN or Infinity (they become null, logged)."""
    return (dumps(data, pretty) + "\n").encode()


def dumps(data: Any, pretty: bool = False) -> str:
    """:func:`dump_json`'s text, without its newline."""
    kwargs: dict[str, Any] = {"sort_keys": True, "default": str, "allow_nan": False,
                              "indent": 2 if pretty else None,
                              "separators": None if pretty else (",", ":")}
    try:
        return json.dumps(data, **kwargs)
    except ValueError:
        log.warning("HTTP API: a value was NaN or infinite; answered as null")
        return json.dumps(finite(data), **kwargs)


def finite(data: Any) -> Any:
    """``data`` with every NaN/±Infinity float replaced by None (containers copied)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data
