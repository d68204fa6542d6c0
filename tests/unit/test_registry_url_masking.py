"""No part of a registry URL's password is shown, whatever the shape of a malformed URL: a
password (or user) holding an unencoded ``/`` or ``?`` moves the ``@`` that ends it into the
prefix or the query, where urlsplit reads hosts, prefix and parameters out of the password."""

from __future__ import annotations

import itertools

import pytest

from discovery.errors import ConfigError
from discovery.registry.url import RegistryURL

#: the parts of a password around its unencoded / or ?: none may show, in an error or the URL
BEFORE = ["", "4321", "Zq7", "65000"]
SEP = ["/", "?", "/Zq8/", "/..", "?ca="]
AFTER = ["", "Zq5", "Zq5 x", "..Zq5", "Zq5:80"]
USERS = ["u", "u/Zq6"]  # (a user with a / hides the password too)
HOSTS = ["h", "h:1", "h1,h2", "[::1]", "h.example.com"]
TAILS = ["", "/p", "/p?ca=/x", "/p?spread=99", "?own=x", "/a b", "/p?nope=1"]


def secret_parts(text: str) -> list[str]:
    return [part for part in text.replace("/", " ").replace("?", " ").replace("=", " ").split()
            if part not in ("..", "ca", "x")]


def shown_by(url: str) -> tuple[list[str], RegistryURL | None]:
    try:
        parsed = RegistryURL.parse(url)
    except ConfigError as exc:
        return [str(exc)], None
    try:
        parsed.with_env({})
    except ConfigError as exc:
        return [str(exc), str(parsed)], parsed
    return [str(parsed), repr(parsed), parsed.to_url()], parsed


def test_no_part_of_a_password_with_a_slash_or_question_mark_is_shown() -> None:
    leaks = []
    for scheme, user, before, sep, after, host, tail in itertools.product(
            ["etcd", "zk"], USERS, BEFORE, SEP, AFTER, HOSTS, TAILS):
        password = f"{before}{sep}{after}"
        url = f"{scheme}://{user}:{password}@{host}{tail}"
        texts, parsed = shown_by(url)
        parts = secret_parts(password)  # (the user may show: it is no secret)
        if parsed is not None:  # accepted: the password is the password, nothing else holds it
            texts += [parsed.prefix, str(parsed.hosts), str(parsed.tls_ca)]
        leaked = [(part, text) for part in parts for text in texts if part in text]
        if leaked:
            leaks.append((url, leaked[0]))
    assert not leaks, f"{len(leaks)} URLs show their password, e.g. {leaks[:5]}"


@pytest.mark.parametrize("url", [
    "etcd://user:4321/Sup3rSecret@host/prefix",  # (read as host user:4321, prefix /Sup3r…)
    "etcd://user:4321/Sup3rSecret@host",
    "zk://user:2181/Sup3rSecret@zk1,zk2/prefix?spread=99",  # (and named in spread='s error)
    "etcd://user:1/a/Sup3rSecret@host:2379/p",  # (a second / hid the @host:port)
    "etcd://user:4321?Sup3rSecret@host/p",  # (read as the query: an unknown parameter)
    "etcd://us/er:Sup3rSecret@host/p",  # (a / in the user: the whole password as prefix)
    "etcd://user:4321/Sup3r Secret@host/p",  # (named as a bad prefix)
    "etcd://user:pw@Sup3r/Secret@host/p",  # (an @ and a / unencoded in it)
])
def test_a_password_before_a_host_without_a_port_is_refused_masked(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        RegistryURL.parse(url)
    assert "Sup3r" not in str(err.value) and "Secret" not in str(err.value)
    assert ":***@" in str(err.value) and "%40" in str(err.value)


@pytest.mark.parametrize(("url", "prefix", "ca"), [
    ("etcd://h/svc@prod", "/svc@prod", None),  # no : before the @: no password can end there
    ("etcd://u@h/team@x/disc", "/team@x/disc", None),
    ("etcd://h:2379/svc%40prod", "/svc@prod", None),  # after a port: written %40
    ("zk://u:pw@h:2181/team%40x/disc", "/team@x/disc", None),
    ("etcd://u:pw@h:1/p?ca=/etc/ca%40prod.pem", "/p", "/etc/ca@prod.pem"),
    ("etcd://h/p?ca=/etc/ca@prod.pem", "/p", "/etc/ca@prod.pem"),
])
def test_an_at_of_the_prefix_or_a_parameter(url: str, prefix: str, ca: str | None) -> None:
    parsed = RegistryURL.parse(url)
    assert (parsed.prefix, parsed.tls_ca) == (prefix, ca)
    if parsed.password is None:  # (else str() shows it masked: refused)
        assert RegistryURL.parse(str(parsed)) == parsed  # str() parses back
    assert RegistryURL.parse(parsed.to_url(reveal=True)) == parsed
