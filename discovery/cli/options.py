"""The registry options every command shares: ``--registry`` plus credentials and TLS.

:func:`registry_options` is a drop-in for a command's ``--registry`` option. It adds
``--registry-ca``, ``--registry-cert``, ``--registry-key``, ``--registry-user`` and
``--registry-password-file`` and folds what was given on the command line into the URL, so the
command still receives one ``registry`` string (or None) and hands it to ``open_registry``::

    @main.command()
    @registry_options()                 # was: @registry_option()
    def services(registry: str, ...): open_registry(registry)

Values from the environment (``DISCOVERY_REGISTRY_CA`` …) are not folded: ``open_registry``
reads the same variables itself (:meth:`RegistryURL.with_env`), which is how the Python client
gets them too. There is no password flag (``ps`` would show it): use
``--registry-password-file``, ``DISCOVERY_REGISTRY_PASSWORD`` or ``…_PASSWORD_FILE``.
The folded URL names the password *file*, never the password, so it is safe to log.

:func:`http_token_option` is ``--http-token-file`` (env ``DISCOVERY_HTTP_TOKEN_FILE``): the
token HTTP API writes need, for the servers that check it and for ``discovery maint`` that
sends it. The command receives the token itself (``http_token``: str or None), read once.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from discovery.cli.output import fail
from discovery.errors import ConfigError
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: option parameter name -> (RegistryURL field, flag, URL spelling, help)
FLAGS: dict[str, tuple[str, str, str, str]] = {
    "registry_ca": ("tls_ca", "--registry-ca", "ca=",
                    "CA certificate (PEM) to verify etcd/ZooKeeper with; implies TLS"),
    "registry_cert": ("tls_cert", "--registry-cert", "cert=",
                      "client certificate (PEM) for TLS; needs --registry-key"),
    "registry_key": ("tls_key", "--registry-key", "key=", "private key (PEM) of --registry-cert"),
    "registry_user": ("user", "--registry-user", "user@",
                      "etcd user / ZooKeeper digest user"),
    "registry_password_file": ("password_file", "--registry-password-file", "password_file=",
                               "file holding the registry password (or use "
                               "DISCOVERY_REGISTRY_PASSWORD)"),
}
_ENV = {"registry_ca": "DISCOVERY_REGISTRY_CA", "registry_cert": "DISCOVERY_REGISTRY_CERT",
        "registry_key": "DISCOVERY_REGISTRY_KEY", "registry_user": "DISCOVERY_REGISTRY_USER",
        "registry_password_file": "DISCOVERY_REGISTRY_PASSWORD_FILE"}
_FILES = {"registry_ca", "registry_cert", "registry_key", "registry_password_file"}


def registry_url_from(options: Mapping[str, Any]) -> str | None:
    """``options["registry"]`` with the ``registry_*`` values of ``options`` folded in.

    Missing or None values are not given. Returns the URL string (None when no registry was
    given and nothing else either). A value that contradicts the URL is a ConfigError, as is
    a credential or TLS file without a registry URL to attach it to.
    """
    registry = options.get("registry")
    given = {name: options[name] for name in FLAGS if options.get(name) is not None}
    if not given:
        return registry
    if not registry:
        flags = ", ".join(FLAGS[n][1] for n in given)
        raise ConfigError(f"{flags} given without --registry: put it in the URL, or use the "
                          "DISCOVERY_REGISTRY_* environment variables (docs/security.md)")
    url = RegistryURL.parse(registry)
    changes: dict[str, Any] = {}
    for name, value in given.items():
        field, flag, spelled, _ = FLAGS[name]
        value = str(value)
        current = getattr(url, field)
        if current is not None and current != value:
            raise ConfigError(f"{flag} {value!r} contradicts {spelled} in --registry")
        if name == "registry_password_file" and url.password is not None:
            raise ConfigError(f"{flag} given, but --registry has a password too")
        changes[field] = value
    return replace(url, **changes).checked().to_url(reveal=True)


def registry_options(required: bool = True) -> Callable[[F], F]:
    """``--registry`` and the credential/TLS options; the command receives ``registry`` only."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            given = {name: kwargs.pop(name, None) for name in FLAGS}
            from_cli = {name: value for name, value in given.items()
                        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
            registry = kwargs.get("registry")
            if (registry and "@" in registry
                    and ctx.get_parameter_source("registry") == ParameterSource.COMMANDLINE):
                url = _parsed_or_none(registry)
                if url is not None and url.password is not None:
                    log.warning("the registry password is on the command line, where ps shows "
                                "it: prefer --registry-password-file or "
                                "DISCOVERY_REGISTRY_PASSWORD")
            try:
                kwargs["registry"] = registry_url_from({"registry": registry, **from_cli})
            except ConfigError as exc:
                fail(str(exc))
            return fn(*args, **kwargs)

        options = [click.option(
            "--registry", envvar="DISCOVERY_REGISTRY", required=required, metavar="URL",
            help="etcd://[user@]h1:2379,h2:2379/prefix[?ca=F&cert=F&key=F] or "
                 "zk://[user@]h1:2181/prefix; etcds://, zks://: TLS [env DISCOVERY_REGISTRY]")]
        for name, (_, flag, _, text) in FLAGS.items():
            path_type = click.Path(exists=True, dir_okay=False, readable=True)
            options.append(click.option(
                flag, name, envvar=_ENV[name], default=None,
                metavar="FILE" if name in _FILES else "NAME",
                type=path_type if name in _FILES else None,
                help=f"{text} [env {_ENV[name]}]"))
        wrapped: Any = command
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped

    return decorate


def _parsed_or_none(registry: str) -> RegistryURL | None:
    try:
        return RegistryURL.parse(registry)
    except ConfigError:
        return None


def http_token_option(client: bool = False) -> Callable[[F], F]:
    """``--http-token-file FILE``; the command receives ``http_token`` (the token or None).
    A file that cannot be read, or holds no usable token, is one line and exit 2.
    ``client``: the command sends the token (``discovery maint``) rather than checks it."""
    from discovery.lookup.http_guard import TOKEN_ENV, TOKEN_FLAG, TOKEN_HEADER, read_token

    if client:
        text = f"File holding the agent's HTTP token, sent as {TOKEN_HEADER}"
    else:
        text = ("File holding the token HTTP API writes (PUT /v1/agent/maint) need; without "
                "it writes are refused")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            path = kwargs.pop("http_token_file", None)
            try:
                kwargs["http_token"] = read_token(path) if path else None
            except ConfigError as exc:
                fail(str(exc))
            return fn(*args, **kwargs)

        option = click.option(TOKEN_FLAG, "http_token_file", envvar=TOKEN_ENV, default=None,
                              metavar="FILE", help=f"{text} [env {TOKEN_ENV}]")
        wrapped: Any = option(command)
        return wrapped

    return decorate


def service_name(value: str) -> str:
    """A SERVICE argument, checked as the model checks service names (a DNS label): a name no
    service can have is one error line and exit 2, not "no instances" (exit 1)."""
    from discovery.errors import ValidationError
    from discovery.model import validate

    try:
        return validate.dns_label("SERVICE", value)
    except ValidationError as exc:
        fail(str(exc))


def datacenter_option() -> Callable[[F], F]:
    """``--datacenter NAME`` (env ``DISCOVERY_DATACENTER``, default ``dc1``): what the
    Consul-compatible endpoints report (``/v1/agent/self``, ``Datacenter`` fields)."""
    from discovery.lookup.consul import DEFAULT_DATACENTER, parse_datacenter

    def check(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        try:
            return parse_datacenter(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None

    return click.option("--datacenter", envvar="DISCOVERY_DATACENTER", metavar="NAME",
                        default=DEFAULT_DATACENTER, show_default=True, callback=check,
                        help="Datacenter the Consul-compatible HTTP endpoints report "
                             "[env DISCOVERY_DATACENTER]")


def zone_option(text: str, default: str | None = None) -> Callable[[F], F]:
    """``--zone NAME`` (env ``DISCOVERY_ZONE``) of ``agent``, ``watch`` and ``up``: this host's
    zone, a DNS label; ``text`` says what the command does with it. A bad name is a usage
    error naming ``--zone`` (exit 2), before anything starts."""
    from discovery.errors import ValidationError
    from discovery.model import validate

    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        try:
            return validate.dns_label("--zone", value) if value else value
        except ValidationError as exc:
            raise click.BadParameter(exc.reason) from None

    return click.option("--zone", envvar="DISCOVERY_ZONE", default=default, metavar="NAME",
                        callback=check, help=f"{text} [env DISCOVERY_ZONE]")


DNS_DOMAIN_HELP = "DNS domain answered: SERVICE.service.DOMAIN"
DNS_TTL_HELP = "TTL of DNS answers, seconds"


def dns_answer_options() -> Callable[[F], F]:
    """``--dns-domain``, ``--dns-ttl`` and ``--dns-udp-answer-limit``: how the DNS endpoint of
    ``up`` and ``watch --dns`` answers (``discovery dns`` names them without ``dns-``)."""
    options = [
        click.option("--dns-domain", default="discovery.", show_default=True,
                     help=DNS_DOMAIN_HELP),
        click.option("--dns-ttl", type=int, default=0, show_default=True,
                     help=DNS_TTL_HELP),
        click.option("--dns-udp-answer-limit", type=click.IntRange(0, 65535), default=3,
                     show_default=True,
                     help="Most answer records in a UDP DNS response (all of them over TCP); "
                          "0: as many as fit"),
    ]

    return _all(options)


def timeout_option(default: float = 5.0) -> Callable[[F], F]:
    """``--timeout SECONDS`` of the one-shot commands: how long the registry may take."""
    def check(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
        if not (math.isfinite(value) and 0 < value <= 3600):
            raise click.BadParameter(f"{value!r}: seconds, more than 0 and at most 3600")
        return value

    return click.option("--timeout", type=float, default=default, show_default=True,
                        callback=check, help="Seconds the registry may take to answer")


def host_options() -> Callable[[F], F]:
    """``--node``, ``--address``, ``--docker``, ``--ttl`` and ``--resync`` of ``agent`` and
    ``up``: what this host registers and how. Given as a flag or in the environment, each wins
    over the ``[agent]`` table of ``--config`` (:func:`given`)."""
    return _all([
        click.option("--node", envvar="DISCOVERY_NODE", default="", show_default="hostname",
                     help="This host's name in the registry [env DISCOVERY_NODE]"),
        click.option("--address", envvar="DISCOVERY_ADDRESS", default="127.0.0.1",
                     show_default=True,
                     help="Advertised IP for published ports [env DISCOVERY_ADDRESS]"),
        click.option("--docker", envvar="DISCOVERY_DOCKER", default=None, metavar="URL",
                     help="dockerd URL; default DOCKER_HOST or the local socket "
                          "[env DISCOVERY_DOCKER]"),
        click.option("--ttl", envvar="DISCOVERY_TTL", type=float, default=10.0,
                     show_default=True, help="etcd lease TTL / ZooKeeper session timeout, "
                                             "seconds [env DISCOVERY_TTL]"),
        click.option("--resync", envvar="DISCOVERY_RESYNC", type=float, default=30.0,
                     show_default=True, help="Reconcile Docker and the registry every N "
                                             "seconds [env DISCOVERY_RESYNC]"),
    ])


def given(ctx: click.Context, names: Iterable[str]) -> set[str]:
    """Those of ``names`` given on the command line or in the environment: they win over the
    configuration file."""
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name for name in names if ctx.get_parameter_source(name) in sources}


def _all(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate
