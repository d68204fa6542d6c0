"""Where the registry is, and how to reach it: the URL that picks a backend.

``etcd://[user[:password]@]h1:2379,h2:2379/prefix[?param=value&...]``, ``zk://`` alike,
``etcds://``/``zks://`` with TLS. The query carries TLS files, a password file, the layout
(``format=nerve``, ``path=``), the resume spread (``spread=``) and how a host follows its own
entries (``own=``); see :class:`RegistryURL`, docs/configuration.md and docs/security.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from discovery.errors import ConfigError
from discovery.retry import RESUME_SPREAD

DEFAULT_PREFIX = "/discovery"
DEFAULT_PORTS = {"etcd": 2379, "zk": 2181}
#: URL scheme -> (backend, TLS). ``etcds://`` / ``zks://`` are TLS with the system CAs
#: unless ``ca=`` names one; any of ``ca=``/``cert=``/``key=`` implies TLS too.
SCHEMES: dict[str, tuple[Literal["etcd", "zk"], bool]] = {
    "etcd": ("etcd", False), "etcds": ("etcd", True), "zk": ("zk", False), "zks": ("zk", True)}
#: query parameter -> RegistryURL field (``key`` is a method of RegistryURL, hence ``tls_*``)
QUERY_PARAMS = {"ca": "tls_ca", "cert": "tls_cert", "key": "tls_key",
                "password_file": "password_file", "format": "format", "path": "path",
                "spread": "spread", "own": "own"}
FORMATS = ("discovery", "nerve")
#: ``own=``: how a host follows the entries of its own that no watch of it follows, by backend
#: (``keys``, the default: each key alone; ``services``: etcd, their services' ranges, which
#: ``etcd grpc-proxy`` coalesces across hosts; ``off``: none, the agent's reconcile alone)
OWN_WATCHES: dict[str, tuple[str, ...]] = {"etcd": ("keys", "services", "off"),
                                           "zk": ("keys", "off")}
SERVICE_PART = "{service}"
#: environment variable -> RegistryURL field, read by :meth:`RegistryURL.with_env`
ENV_VARS = {"DISCOVERY_REGISTRY_USER": "user", "DISCOVERY_REGISTRY_PASSWORD": "password",
            "DISCOVERY_REGISTRY_PASSWORD_FILE": "password_file",
            "DISCOVERY_REGISTRY_CA": "tls_ca", "DISCOVERY_REGISTRY_CERT": "tls_cert",
            "DISCOVERY_REGISTRY_KEY": "tls_key"}
MASK = "***"


#: a path whose first part ends in ``@host:port``: the rest of a password with a ``/`` (a
#: prefix may hold an ``@`` itself: ``/svc@prod``)
_HOSTS_IN_PATH = re.compile(r"^/[^/]*@[^/@]*:\d+(,|/|$)")
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _host(host: str) -> bool:
    """Whether ``host`` is an IP address or a host name (ASCII labels of 1..63 characters):
    ``zk1..example.com`` or an IPv6 address without brackets (``::1`` read as ``:`` and port
    1) is refused here, not by a connection thread that dies of it."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOST_NAME.fullmatch(host) is not None
    return True


def mask_url(text: str) -> str:
    """``text`` (a registry URL as given, maybe malformed) with any password replaced by ***.

    Masks from the first ``:`` of the userinfo up to the *last* ``@``, so a password holding
    an unencoded ``/``, ``?`` or ``@`` is hidden too (at worst a little more is masked).
    """
    head, sep, rest = text.partition("://")
    if not sep:
        head, rest = "", text
    if "@" not in rest:
        return text
    userinfo, _, tail = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{head}{sep}{user}{colon and ':' + MASK}@{tail}"


@dataclass(frozen=True)
class RegistryURL:
    """Where the registry is, and how to authenticate to it. ``str()`` never shows the password.

    ``etcd://[user[:password]@]h1:2379,h2:2379/prefix[?ca=F&cert=F&key=F&password_file=F]``,
    ``zk://...`` alike (user/password: digest auth), ``etcds://``/``zks://``: TLS.
    """

    scheme: Literal["etcd", "zk"]
    hosts: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    format: str | None = None  # None: ours; "nerve": Airbnb Nerve's ZooKeeper nodes
    path: str | None = None  # nerve: where service S's nodes are, with {service} for S
    spread: str | None = None  # seconds: a host's resume after an outage (retry.RESUME_SPREAD)
    own: str | None = None  # None: "keys" (OWN_WATCHES)

    @property
    def nerve(self) -> bool:
        return self.format == "nerve"

    @classmethod
    def parse(cls, url: str) -> RegistryURL:
        """``etcd://h1:2379,h2:2379/prefix`` or ``zk://h1:2181/prefix``, plus credentials/TLS."""
        if not url:
            raise ConfigError("registry URL is empty (set --registry or DISCOVERY_REGISTRY)")
        shown = mask_url(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address (its text may
            raise ConfigError(f"registry URL {shown!r}: {mask_url(str(exc))}") from None  # quote
        if _HOSTS_IN_PATH.search(parts.path) or parts.fragment or url.endswith("#"):  # the
            raise ConfigError(f"registry URL {shown!r}: hosts in the prefix, or a # (percent-"
                              "encode / ? # @ : in a user or password: %2F %3F %23 %40 %3A)")
        if parts.scheme.lower() not in SCHEMES:
            raise ConfigError(f"registry URL {shown!r}: scheme must be etcd://, etcds://, zk:// "
                              "or zks://")
        scheme, tls = SCHEMES[parts.scheme.lower()]
        userinfo, at, netloc = parts.netloc.rpartition("@")
        user = password = None
        if at:
            user_s, colon, password_s = userinfo.partition(":")
            user, password = unquote(user_s), unquote(password_s) if colon else None
            if not user:
                raise ConfigError(f"registry URL {shown!r}: user is empty")
            if password == "":
                raise ConfigError(f"registry URL {shown!r}: password is empty")
            if password == MASK:
                raise ConfigError(f"registry URL {shown!r}: the password is masked ({MASK}); "
                                  "give the real one (DISCOVERY_REGISTRY_PASSWORD, "
                                  "--registry-password-file or password_file=)")
        hosts: list[tuple[str, int]] = []
        for item in netloc.split(","):
            if not item:
                raise ConfigError(f"registry URL {shown!r}: empty host")
            host, sep, port_s = item.rpartition(":")
            if not sep or "]" in port_s:
                host, port_s = item, str(DEFAULT_PORTS[scheme])
            host = host.strip("[]")
            if not _host(host) or not (port_s.isascii() and port_s.isdigit() and
                                       len(port_s) <= 5 and 0 < int(port_s) < 65536):
                if "@" in url and not at:  # userinfo not split off: item may hold the password
                    raise ConfigError(f"registry URL {shown!r}: bad host:port (percent-encode "
                                      "/ ? # @ : in a user or password)")
                raise ConfigError(f"registry URL {shown!r}: bad host:port {item[:80]!r} (a host "
                                  "name or IP address, an IPv6 one in brackets: [::1]:2379)")
            hosts.append((host, int(port_s)))
        prefix = "/" + parts.path.strip("/") if parts.path.strip("/") else DEFAULT_PREFIX
        if any(c in prefix for c in "\x00\n\r ") or "//" in prefix:
            raise ConfigError(f"registry URL {shown!r}: bad prefix {prefix!r}")
        if _relative(prefix):  # ZooKeeper refuses them; on etcd they would only mislead
            raise ConfigError(f"registry URL {shown!r}: bad prefix {prefix!r}: . and .. "
                              "parts are not allowed")
        params = _query(parts.query, shown)
        url_obj = cls(scheme=scheme, hosts=tuple(hosts), prefix=prefix, user=user,
                      password=password, tls=tls, **params)
        return url_obj.checked()

    def checked(self) -> RegistryURL:
        """This URL, after the checks that do not need the files; TLS on when a file implies it."""
        tls = self.tls or any((self.tls_ca, self.tls_cert, self.tls_key))
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("cert", "key") if self.tls_cert else ("key", "cert")
            raise ConfigError(f"registry URL '{self}': {given}= needs {missing}= too "
                              "(a client certificate and its private key)")
        if self.password is not None and self.password_file is not None:
            raise ConfigError(f"registry URL '{self}': a password and password_file= both given")
        if self.scheme == "zk" and self.user and ":" in self.user:
            raise ConfigError(f"registry URL '{self}': a ZooKeeper digest user cannot contain ':'")
        self._check_layout()
        _ = self.resume_spread
        return self if tls == self.tls else replace(self, tls=tls)

    @property
    def resume_spread(self) -> float:
        """``spread=``: the window (s) over which a host spreads its resume after an outage."""
        if self.spread is None:
            return RESUME_SPREAD
        try:
            value = float(self.spread)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 60:
            raise ConfigError(f"registry URL '{self}': spread= must be seconds from 0 to 60")
        return value

    @property
    def own_watch(self) -> str:
        """``own=``: how this host follows its own entries no watch of it follows."""
        return self.own or "keys"

    def _check_layout(self) -> None:
        if self.own not in (None, *OWN_WATCHES[self.scheme]):
            raise ConfigError(f"registry URL '{self}': own= must be one of "
                              f"{', '.join(OWN_WATCHES[self.scheme])} on {self.scheme}://")
        if self.format not in (None, *FORMATS):
            raise ConfigError(f"registry URL '{self}': format= must be one of "
                              f"{', '.join(FORMATS)}")
        if self.nerve and self.scheme != "zk":
            raise ConfigError(f"registry URL '{self}': format=nerve is ZooKeeper's (zk://)")
        if self.path is None:
            return
        segments = self.path.split("/")
        if not self.nerve:
            raise ConfigError(f"registry URL '{self}': path= goes with format=nerve")
        if (not self.path.startswith("/") or segments.count(SERVICE_PART) != 1
                or SERVICE_PART in self.path.replace(f"/{SERVICE_PART}", "", 1)
                or any(not part for part in segments[1:]) or _relative(self.path)
                or any(c in self.path for c in "\x00\n\r ")):
            raise ConfigError(f"registry URL '{self}': path= must be an absolute ZooKeeper "
                              f"path (no empty, . or .. parts) with {SERVICE_PART} as one "
                              "whole part, e.g. "
                              f"/nerve/services/{SERVICE_PART}/services")

    def with_env(self, environ: Mapping[str, str] | None = None) -> RegistryURL:
        """Fill what the URL leaves out from ``DISCOVERY_REGISTRY_{USER,PASSWORD,
        PASSWORD_FILE,CA,CERT,KEY}`` (empty values count as unset); the URL wins."""
        env = os.environ if environ is None else environ
        values = {name: env.get(var) or None for var, name in ENV_VARS.items()}
        if self.user is not None and values["user"] not in (None, self.user):
            values["password"] = values["password_file"] = None  # another user's secret
        if self.password is not None or self.password_file is not None:
            values["password"] = values["password_file"] = None
        if values["password"] is not None:
            values["password_file"] = None  # the variable wins over the file
        changes = {name: value for name, value in values.items()
                   if value is not None and getattr(self, name) is None}
        return replace(self, **changes).checked() if changes else self  # type: ignore[arg-type]

    def to_url(self, reveal: bool = False) -> str:
        """The URL as a string; the password shows as *** unless ``reveal``."""
        scheme = self.scheme + ("s" if self.tls else "")
        userinfo = ""
        if self.user is not None:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + (quote(self.password, safe="") if reveal else MASK)
            userinfo += "@"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        query = "&".join(f"{param}={quote(value, safe='/{}')}"
                         for param, name in QUERY_PARAMS.items()
                         if (value := getattr(self, name)) is not None)
        return f"{scheme}://{userinfo}{hosts}{self.prefix}{'?' + query if query else ''}"

    def __str__(self) -> str:
        return self.to_url()

    def _template(self) -> tuple[str, str]:
        """(the path above the service names, the path below one) of this layout."""
        if not self.nerve:
            return f"{self.prefix}/services", ""
        if self.path is None:
            return self.prefix, ""
        head, _, tail = self.path.partition(f"/{SERVICE_PART}")
        return head or "/", tail

    @property
    def services_root(self) -> str:
        """``<prefix>/services`` (Nerve: ``<prefix>``): its children are the services."""
        return self._template()[0]

    def service_dir(self, service: str) -> str:
        """Where ``service``'s instances are (Nerve: the path with ``{service}`` filled in)."""
        head, tail = self._template()
        return f"{head.rstrip('/')}/{service}{tail}"

    def key(self, service: str, instance_id: str) -> str:
        return f"{self.service_dir(service)}/{instance_id}"

    def split_key(self, key: str) -> tuple[str, str] | None:
        """``(service, instance_id)`` of a key under this prefix, or None. Nerve: ``(service,
        node name)``, the node name being ``<instance>_<sequence>``."""
        head, tail = self._template()
        head = head.rstrip("/") + "/"
        if not key.startswith(head):
            return None
        parts = key[len(head):].split("/")
        tail_parts = tail.split("/")[1:] if tail else []
        if len(parts) != 2 + len(tail_parts) or not all(parts):
            return None
        if parts[1:-1] != tail_parts:
            return None
        return parts[0], parts[-1]


def _relative(path: str) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` part (which ZooKeeper refuses)."""
    return any(part in (".", "..") for part in path.split("/"))


def _query(query: str, shown: str) -> dict[str, str]:
    """The ``?ca=…&cert=…&key=…&password_file=…`` of a registry URL, as RegistryURL fields."""
    params: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        raw_name, _, raw_value = item.partition("=")
        name, value = unquote(raw_name), unquote(raw_value)
        if name not in QUERY_PARAMS:
            raise ConfigError(f"registry URL {shown!r}: unknown parameter {name!r} "
                              f"(known: {', '.join(QUERY_PARAMS)})")
        if QUERY_PARAMS[name] in params:
            raise ConfigError(f"registry URL {shown!r}: parameter {name}= given twice")
        if not value or "\x00" in value:  # (no file has a NUL in its path)
            raise ConfigError(f"registry URL {shown!r}: parameter {name}= is empty or has a NUL")
        params[QUERY_PARAMS[name]] = value.lower() if name in ("format", "own") else value
    return params
