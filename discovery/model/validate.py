"""Validators for every value that comes from a label, env var or the registry.

Nothing from outside reaches the registry, an HAProxy config or a DNS answer
without passing one of these. Each raises :class:`ValidationError` naming the culprit.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from discovery.errors import ConfigError, ValidationError

MAX_VALUE = 512
MAX_TAGS = 32
MAX_META = 64

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_META_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9.:_-]{0,200}$")


_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})  # controls, format, separators


_PLAIN_ASCII = re.compile(r"[\x20-\x7e]*")


#: the most characters :func:`shown` gives for a value from outside, its marker included
SHOWN_MAX = 200
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    if ch.isprintable():
        return ch
    code = ord(ch)
    return _ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """``value`` (a registry key, a node path, a value read from outside) as a log line or an
    error message may show it: every character that is not printable (controls, format/bidi
    characters such as U+202E and U+200B, line and paragraph separators, surrogates,
    unassigned) escaped as ``repr`` does (``\\n``, ``\\x1b``, ``\\u202e``), and at most
    ``limit`` characters: a longer one is cut and ends ``...(N chars)``, N its full length.
    Not a string: its ``repr``, the same way. Idempotent (what it gives, it gives back as is),
    so each layer may apply it; backslashes are left as they are for that."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = repr(value)
        except Exception:  # an integer of more digits than str() allows, a broken __repr__
            text = f"<{type(value).__name__}>"
    if len(text) <= limit and text.isprintable():  # the common case, checked in C
        return text
    if len(text) <= limit:
        whole = "".join(_escaped(ch) for ch in text)
        if len(whole) <= limit:
            return whole
    marker = f"...({len(text)} chars)"
    room = max(0, limit - len(marker))
    parts: list[str] = []
    for ch in text[:room]:
        part = _escaped(ch)
        room -= len(part)
        if room < 0:  # never half an escape
            break
        parts.append(part)
    return "".join(parts) + marker


def blank_unprintable(text: str) -> str:
    """``text`` with each character :func:`_printable` refuses (controls, format/bidi
    characters, line/paragraph separators, surrogates, private use, unassigned) made a
    space: for output shown on one line that is not a value to refuse (a check's output)."""
    if _PLAIN_ASCII.fullmatch(text):
        return text
    return "".join(" " if unicodedata.category(ch) in _UNPRINTABLE else ch for ch in text)


def _printable(culprit: str, value: str) -> None:
    if len(value) > MAX_VALUE:
        raise ValidationError(culprit, f"value too long ({len(value)} > {MAX_VALUE} chars)")
    if _PLAIN_ASCII.fullmatch(value):  # the common case, checked in C
        return
    for ch in value:
        if unicodedata.category(ch) in _UNPRINTABLE:
            raise ValidationError(culprit, f"control character {ord(ch):#04x} not allowed")


def dns_label(culprit: str, value: str) -> str:
    """A service name, tag or node name: one lowercase DNS label (RFC 1123)."""
    _printable(culprit, value)
    if not _DNS_LABEL.fullmatch(value):
        raise ValidationError(
            culprit,
            f"{value[:64]!r} is not a DNS label (lowercase a-z, 0-9 and '-', 1-63 chars, "
            "no leading or trailing '-')",
        )
    return value


def port(culprit: str, value: str | int) -> int:
    if isinstance(value, str):
        _printable(culprit, value)
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise ValidationError(culprit, f"port {value[:32]!r} is not a number")
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValidationError(culprit, f"port {shown(value, 64)} is not in 1..65535")
    return value


def weight(culprit: str, value: str | int) -> int:
    if isinstance(value, str):
        _printable(culprit, value)
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise ValidationError(culprit, f"weight {value[:32]!r} is not a number")
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise ValidationError(culprit, f"weight {shown(value, 64)} is not in 0..256")
    return value


IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
#: never an instance's address, though unicast: HAProxy would route to it and DNS answer it, so
#: one registry write would make every host's HAProxy a proxy to what only that host may reach
#: (docs/security.md, "Registry values"). Loopback, private and public addresses stay allowed.
_NOT_AN_INSTANCE: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "a 'this network' address (0.0.0.0/8)"),
    (ipaddress.ip_network("169.254.0.0/16"),
     "a link-local address (169.254.0.0/16: cloud metadata endpoints)"),
    (ipaddress.ip_network("240.0.0.0/4"), "a reserved address (240.0.0.0/4)"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address (fe80::/10)"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "a cloud metadata endpoint (AWS IMDS)"),
    (ipaddress.ip_network("100.100.100.200/32"), "a cloud metadata endpoint (Alibaba Cloud)"),
)
#: IPv6 addresses that reach the IPv4 address in their last 32 bits through a translator:
#: NAT64's well-known prefix (RFC 6052) and SIIT's IPv4-translated ``::ffff:0:a.b.c.d``
#: (``64:ff9b::a9fe:a9fe`` is 169.254.169.254 behind a NAT64). A site's own prefix (RFC 8215's
#: ``64:ff9b:1::/48`` among them) may put the IPv4 bits elsewhere: not decoded here
_EMBEDS_V4 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96"))


def _ip(culprit: str, value: str) -> IP:
    """A plain IP address: no scope id (``fe80::1%eth0``), which Python accepts with spaces
    and brackets in it and HAProxy would read as more tokens."""
    if not isinstance(value, str):
        raise ValidationError(culprit, "must be a string")
    _printable(culprit, value)
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(culprit, f"{value[:64]!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValidationError(culprit, f"{value[:64]!r}: IPv6 scope ids are not allowed")
    return ip


def unicast_ip(culprit: str, value: str) -> IP:
    """The address of an instance: a plain unicast IPv4 or IPv6 address, not link-local,
    reserved, "this network" nor a cloud metadata endpoint (loopback is allowed)."""
    return unicast(culprit, _ip(culprit, value))


def unicast(culprit: str, ip: IP) -> IP:
    """``ip`` itself, if an address object :func:`unicast_ip` would give (no scope id, unicast)."""
    if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise ValidationError(culprit, f"{ip!r:.64} is not an IP address object")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValidationError(culprit, f"{str(ip)[:64]!r}: IPv6 scope ids are not allowed")
    # an IPv4-mapped IPv6 address (::ffff:169.254.169.254) reaches its IPv4 address, as a
    # translated one does (NAT64, SIIT)
    as_v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _EMBEDS_V4):
        as_v4 = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    for one in (ip, as_v4) if as_v4 is not None else (ip,):
        if one.is_unspecified or one.is_multicast or one == _LIMITED_BROADCAST:
            raise ValidationError(culprit, f"{str(ip)[:64]!r} is not a unicast address")
        for net, what in _NOT_AN_INSTANCE:
            if one.version == net.version and one in net:
                named = f"{str(ip)[:64]!r}" + (f" ({one})" if one is as_v4 else "")
                raise ValidationError(culprit, f"{named} is {what}: not allowed as an "
                                      "instance's address")
    return ip


def address(culprit: str, value: str) -> str:
    """An instance's address in canonical form (see :func:`unicast_ip`)."""
    return str(unicast_ip(culprit, value))


def bind_address(culprit: str, value: str) -> str:
    """An address to listen on, canonical: unicast, or the wildcard ``0.0.0.0`` / ``::``."""
    ip = _ip(culprit, value)
    if ip.is_multicast or ip == _LIMITED_BROADCAST:
        raise ValidationError(culprit, f"{value[:64]!r} cannot be listened on")
    return str(ip)


def tags(culprit: str, values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_TAGS:
        raise ValidationError(culprit, f"too many tags ({len(values)} > {MAX_TAGS})")
    return tuple(sorted({dns_label(culprit, t) for t in values}))


def meta(culprit: str, values: dict[str, str]) -> dict[str, str]:
    if len(values) > MAX_META:
        raise ValidationError(culprit, f"too many meta keys ({len(values)} > {MAX_META})")
    out: dict[str, str] = {}
    for k, v in values.items():
        if not isinstance(k, str) or not _META_KEY.fullmatch(k):
            raise ValidationError(
                culprit, f"meta key {str(k)[:64]!r} is not [A-Za-z0-9_.-]{{1,64}}"
            )
        if not isinstance(v, str):
            raise ValidationError(f"{culprit}.{k}", "meta value must be a string")
        _printable(f"{culprit}.{k}", v)
        out[k] = v
    return dict(sorted(out.items()))


def instance_id(culprit: str, value: str) -> str:
    _printable(culprit, value)
    if not _INSTANCE_ID.fullmatch(value):
        raise ValidationError(culprit, f"{value[:64]!r} is not a valid instance id")
    return value


def text(culprit: str, value: str) -> str:
    """Free text (container name, image): printable, bounded."""
    if not isinstance(value, str):
        raise ValidationError(culprit, "must be a string")
    _printable(culprit, value)
    return value



def listen(culprit: str, value: str, default_port: int | None = None, *,
           port_zero: bool = False, localhost: bool = False) -> tuple[str, int]:
    """A listen address → ``(ip, port)``: ``IP:PORT``, ``[IPv6]:PORT``, ``:PORT``, ``PORT``, or
    ``IP`` / ``[IPv6]`` alone when there is a ``default_port``. No address means loopback.
    ``port_zero``: port 0 (any free port) is allowed; ``localhost``: the name stands for
    127.0.0.1. One :class:`ConfigError` naming ``culprit`` and the value otherwise."""
    text = value.strip()
    port_text = str(default_port) if default_port is not None else ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{culprit} {value!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:] if rest else port_text
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.isdigit():
        host, port_text = "", text
    else:
        host = text
    if localhost and host == "localhost":
        host = ""
    if not port_text:
        raise ConfigError(f"{culprit} {value!r}: needs a port")
    try:
        ip = bind_address(culprit, host or "127.0.0.1")
        number = 0 if port_zero and port_text == "0" else port(culprit, port_text)
    except ValidationError as exc:
        raise ConfigError(f"{culprit} {value!r}: {exc.reason}") from None
    return ip, number
