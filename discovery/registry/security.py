"""Credentials and TLS of a registry: read when the registry is opened, never logged.

- :func:`load_secrets` reads the password file and the PEM files a :class:`RegistryURL` names,
  with one :class:`ConfigError` naming the parameter when one is missing or unreadable, not a
  regular file (a FIFO, a device) or too big (:mod:`discovery.registry.secret_files`).
- etcd: :func:`etcd_channel_credentials` (TLS, one set for every endpoint) and
  :class:`EtcdAuth` (user/password: a token got lazily, and again whenever etcd forgot it).
- ZooKeeper: :func:`zk_client_options` (digest auth, TLS; the agent's nodes get
  ``digest:<user>`` ALL + ``world:anyone`` READ: readers need no secret). See docs/security.md.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from kazoo.security import ACL, Permissions, make_acl, make_digest_acl
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from discovery.errors import ConfigError, LoginRefused, RegistryError
from discovery.registry.etcd_aio import timed_out_in_server
from discovery.registry.secret_files import WHERE_SET, pem, read_file
from discovery.registry.url import RegistryURL
from discovery.retry import RetryAt

log = logging.getLogger(__name__)

_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: etcd's word that the credentials are wrong (a bad password, no such user): a refused login
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION)
_STALE = ("unauthenticated", "invalid auth token", "user name is empty", "auth store is old")
#: a JWT (``--auth-token jwt``) is renewed at a random moment between these fractions of its
#: life left when issued: a fleet whose tokens were issued together does not log in together
RENEW_WITHIN = (0.5, 0.9)
#: a token issued with less life left (a clock far from etcd's) is renewed when etcd says it
#: expired, as a simple token is; a renewal that failed is tried again this late at the soonest
RENEW_MIN = 20.0
#: a refused login's wait, ± this fraction (at most a minute): without it a fleet refused at
#: once logged in again in lockstep, a wave of bcrypts each minute (bench/auth_refused.py)
JITTER = 0.25


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (UNIX time) of an etcd JWT (read, not verified); None for others."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:  # not base64, not UTF-8, not JSON
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@dataclass(frozen=True)
class Secrets:
    """What :func:`load_secrets` read: the password and the PEM bytes (repr hides secrets)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)


def load_secrets(url: RegistryURL) -> Secrets:
    """Read the password (file) and the TLS files of ``url``; ConfigError naming what is wrong."""
    password = url.password
    if password is None and url.password_file is not None:
        raw = read_file(url.password_file, "password_file")
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"registry password_file= {url.password_file!r}: "
                              "not UTF-8 text") from None
        if not password:
            raise ConfigError(f"registry password_file= {url.password_file!r} is empty")
    if url.user is not None and password is None:
        raise ConfigError(f"registry URL '{url}': user {url.user!r} has no password "
                          f"(give it by {WHERE_SET['password']})")
    if url.user is None and password is not None:
        raise ConfigError(f"registry URL '{url}': a password but no user (give the user as "
                          "user@ in the URL, --registry-user or DISCOVERY_REGISTRY_USER)")
    secrets = Secrets(user=url.user, password=password, ca=pem(url.tls_ca, "ca"),
                      cert=pem(url.tls_cert, "cert"), key=pem(url.tls_key, "key"))
    if url.tls_cert is not None and url.tls_key is not None:
        try:  # else only the handshake fails, after the timeout, naming no file
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                url.tls_cert, url.tls_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"registry key= file {url.tls_key!r} does not go with cert= "
                              f"{url.tls_cert!r}, or is encrypted (give an unencrypted key): "
                              f"{getattr(exc, 'reason', None) or exc}") from None
    return secrets


# -- etcd -------------------------------------------------------------------------------------


def etcd_channel_credentials(secrets: Secrets) -> grpc.ChannelCredentials:
    """TLS for every endpoint: our CA (else the system's) and, if given, our client cert."""
    return grpc.ssl_channel_credentials(root_certificates=secrets.ca, private_key=secrets.key,
                                        certificate_chain=secrets.cert)


def rpc_details(exc: BaseException) -> str:
    """``CODE: details`` of a gRPC failure (also when pyetcd wrapped it), with a hint."""
    rpc: BaseException | None = exc
    if not isinstance(rpc, grpc.RpcError):
        rpc = exc.__cause__ or exc.__context__
    if not (isinstance(rpc, grpc.RpcError) and hasattr(rpc, "code")):
        return str(exc) or type(exc).__name__
    details = str(rpc.details() or "")
    return f"{rpc.code().name}: {details}{hint(details)}"


def hint(details: str) -> str:
    """What to check for a gRPC error message from etcd."""
    low = details.lower()
    if any(m in low for m in ("unwrap failed", "tsi_data_corrupted", "bad_certificate",
                              "certificate_unknown", "certificate_required", "closed by")):
        return (" (TLS: the server refused us: is our client certificate (cert=, key=) missing,"
                " or not signed by a CA the server trusts?)")
    if "verify_failed" in low or "certificate verify" in low:
        return (" (TLS: we do not trust the server certificate: check ca=, and that the "
                "certificate names the host or IP of the URL)")
    if any(w in low for w in ("handshake", "ssl", "certificate", "tls")):
        return " (TLS failed: check the registry's ca=, cert= and key=, and that it wants TLS)"
    if "user name is empty" in low:
        return " (etcd has authentication enabled: give a registry user and password)"
    if "permission denied" in low:
        return " (the registry user lacks a role granting this key range)"
    if "socket closed" in low and "failed to connect" in low:
        return " (if the server wants TLS: use etcds:// or ca=)"
    return ""


class EtcdAuth:
    """The etcd auth token of one client, or nothing when the URL has no user.

    pyetcd authenticates only in its constructor (which fails while etcd is down), never again;
    etcd forgets simple tokens on restart and ``--auth-token-ttl`` idle. :meth:`ensure` gets a
    token when we have none into ``client.metadata`` (every pyetcd call sends it); :meth:`stale`
    tells whether an error means "authenticate again". A login etcd refuses (a rotated password, a
    removed user) is not asked again before a wait doubling from 1 s to a minute (±25 %): the calls
    meanwhile fail with the same error, for a failed login costs etcd a bcrypt (~61 ms of its
    CPU), and every host of a fleet with the old password would otherwise try at every call.
    A JWT is renewed ahead of its expiry, at a random moment (:data:`RENEW_WITHIN`)."""

    def __init__(self, client: Any, secrets: Secrets, where: str) -> None:
        self._client, self._where = client, where
        self._user, self._password = secrets.user, secrets.password
        self.enabled = secrets.user is not None
        self._lock = threading.Lock()
        self._refusals = RetryAt(1.0, 60.0)  # a refused login: when it may be asked again
        self._refused: RegistryError | None = None
        self._renew_at = math.inf  # monotonic: when the JWT held is renewed ahead of expiry
        self._renewing = False  # one caller renews; the others go on with the token held
        if self.enabled:
            client.metadata = None  # no token yet

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For our own stubs (the watch stream): the token header, if any."""
        return tuple(self._client.metadata or ())

    @property
    def ready(self) -> bool:
        """No call needs :meth:`ensure` to authenticate first (none enabled, or a token)."""
        return not self.enabled or self._client.metadata is not None

    def ensure(self) -> None:
        """Authenticate unless we hold a token. Transient failures raise pyetcd's
        ConnectionFailedError (retry elsewhere); a refusal raises LoginRefused."""
        if not self.enabled:
            return
        if self._client.metadata is not None:
            if time.monotonic() >= self._renew_at:
                self._renew()
            return
        with self._lock:
            if self._client.metadata is not None:
                return
            if self._refused is not None:
                if not self._refusals.taken():
                    left = self._refusals.remaining() or 0.0
                    raise LoginRefused(f"{self._refused} (asked again in {left:.1f} s)", left)
                self._refused = None  # asked now (a login that times out holds nothing)
            try:
                self._client.metadata = self._issued(self._authenticate())
            except LoginRefused as exc:
                self._refused = exc
                exc.retry_in = self._refusals.failed(JITTER)  # a fleet refused at once: apart
                raise
            self._refusals.succeeded()

    def _renew(self) -> None:
        """A new JWT ahead of the held one's expiry, by one caller, outside the lock: the
        others go on with the token held (it serves on if this fails)."""
        with self._lock:
            held = self._client.metadata
            if self._renewing or held is None or time.monotonic() < self._renew_at:
                return
            self._renewing = True
        try:
            metadata = self._authenticate()
        except Exception as exc:  # refused (a rotated password), or no answer: not now
            with self._lock:  # a refusal (a failed bcrypt each) waits the refusals' doubling
                wait = max(RENEW_MIN, self._refusals.failed(JITTER)
                           if isinstance(exc, LoginRefused) else 0)
                if self._client.metadata is held:  # else dropped, and logged in again meanwhile
                    self._renew_at = time.monotonic() + wait
            log.warning("etcd at %s: renewing the auth token ahead of its expiry failed (%s); "
                        "the one held serves on, tried again in %g s", self._where,
                        rpc_details(exc), wait)
        else:
            with self._lock:  # else a newer login (or a refused one) came meanwhile: its state
                if self._client.metadata is held:
                    self._client.metadata = self._issued(metadata)
                    self._refused = None
                    self._refusals.succeeded()
        finally:
            self._renewing = False

    def _issued(self, metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """``metadata`` (a new token), with its renewal planned if it is a JWT."""
        expiry = token_expiry(dict(metadata).get("token", ""))
        life = 0.0 if expiry is None else expiry - time.time()
        self._renew_at = (time.monotonic() + life * random.uniform(*RENEW_WITHIN)
                          if life >= RENEW_MIN else math.inf)
        return metadata

    def _authenticate(self) -> tuple[tuple[str, str], ...]:
        request = etcdrpc.AuthenticateRequest(name=self._user, password=self._password)
        try:
            resp = self._client.authstub.Authenticate(request, self._client.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), str(exc.details() or "")
            if code in _DOWN or timed_out_in_server(code, details):  # (or in an election)
                self._client.endpoint_in_use.fail()
                raise etcd_exc.ConnectionFailedError() from exc
            if code == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in details:
                log.warning("etcd at %s has authentication disabled; the registry user %r "
                            "is not used", self._where, self._user)
                return ()
            error = LoginRefused if code in _REFUSED else RegistryError  # else: busy
            raise error(f"etcd at {self._where}: authentication as {self._user!r} "
                        f"failed: {code.name}: {details}{hint(details)}") from None
        log.debug("etcd at %s: authenticated as %r", self._where, self._user)
        return (("token", str(resp.token)),)

    def stale(self, error: grpc.RpcError | str) -> bool:
        """True (and the token dropped) when ``error`` (or a watch's cancel reason) asks for a
        new token: etcd restarted, the token idled out, or the auth store changed."""
        if not self.enabled:
            return False
        if isinstance(error, str):
            text = error
        else:
            text = f"{error.code().name} {error.details() if hasattr(error, 'details') else ''}"
        if not any(mark in text.lower() for mark in _STALE):
            return False
        self.drop()
        return True

    def drop(self) -> None:
        """Forget the token: the next :meth:`ensure` logs in. No lock: the watch's loop thread
        calls it, and must not wait for a login."""
        if self.enabled:
            self._client.metadata = None


# -- ZooKeeper --------------------------------------------------------------------------------


def zk_acl(secrets: Secrets) -> list[ACL] | None:
    """The ACL of every node we create: our digest identity ALL, everyone READ."""
    if secrets.user is None or secrets.password is None:
        return None
    return [make_digest_acl(secrets.user, secrets.password, all=True),
            make_acl("world", "anyone", read=True)]


#: kazoo's own log lines go through this logger (its ``logger=``): at debug level its Auth
#: request carries the password (``auth='user:password'``), masked by :class:`MaskAuth`
KAZOO_LOGGER = "discovery.registry.kazoo"


class MaskAuth(logging.Filter):
    """Masks the password of a ZooKeeper digest ``Auth`` request in a log line, to the line's
    last closing quote and ``)``: a quote or a ``)`` in it ends no part of the mask."""

    _AUTH = re.compile(r"(auth=b?(['\"])[^:]*:)(?:.*(?=\2\))|.*)")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "auth=" in text:
            record.msg, record.args = self._AUTH.sub(r"\1***", text), ()
        return True


def kazoo_logger() -> logging.Logger:
    logger = logging.getLogger(KAZOO_LOGGER)
    if not any(isinstance(f, MaskAuth) for f in logger.filters):
        logger.addFilter(MaskAuth())
    return logger


def zk_client_options(url: RegistryURL, secrets: Secrets) -> dict[str, Any]:
    """KazooClient keyword arguments for digest auth, our ACL, TLS and our logger."""
    options: dict[str, Any] = {"logger": kazoo_logger()}
    acl = zk_acl(secrets)
    if acl is not None:
        options["auth_data"] = {("digest", f"{secrets.user}:{secrets.password}")}
        options["default_acl"] = acl
    if url.tls:
        options.update(use_ssl=True, verify_certs=True, check_hostname=True, ca=url.tls_ca,
                       certfile=url.tls_cert, keyfile=url.tls_key)
    return options


def zk_open_acl(acls: list[ACL]) -> str | None:
    """The entries of a (parent) node's ACL that let anyone delete its children, or None."""
    open_ = [a for a in acls if a.id.scheme == "world"
             and a.perms & (Permissions.DELETE | Permissions.ADMIN)]
    return ", ".join(f"world:{a.id.id}:{','.join(a.acl_list)}" for a in open_) or None


def tls_context(url: RegistryURL) -> ssl.SSLContext:
    """A client TLS context from the URL's ``ca=``, ``cert=`` and ``key=`` (for our own
    sockets to a ZooKeeper member; kazoo builds its own from the same)."""
    ctx = ssl.create_default_context(cafile=url.tls_ca)
    if url.tls_cert:
        ctx.load_cert_chain(url.tls_cert, url.tls_key)
    return ctx


def tls_probe(url: RegistryURL, timeout: float = 1.0) -> str:
    """Why a TLS connection to the first host of ``url`` fails, as `` (TLS: …)``; "" when it
    does not (or the host is down). For error messages only: kazoo just says "not connected"."""
    host, port = url.hosts[0]
    try:
        ctx = tls_context(url)
        with socket.create_connection((host, port), timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as conn:
            conn.settimeout(timeout / 2)
            if conn.recv(1) == b"":  # TLS 1.3: a refused client certificate shows up here
                reason = "connection closed by the server"
            else:
                return ""
    except (TimeoutError, ConnectionRefusedError):
        return ""
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
    except OSError as exc:
        if "ssl" not in str(exc).lower():
            return ""
        reason = str(exc)
    return f" (TLS: {reason}){hint(reason)}"
