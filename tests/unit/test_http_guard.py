"""The HTTP API's pure guards: Host check, token reading and matching, blocking slots,
ASCII-only numbers, finite JSON, strict query parsing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from discovery.errors import ConfigError
from discovery.lookup.http_guard import (
    ascii_int,
    dump_json,
    host_allowed,
    presented_token,
    read_token,
    token_matches,
)
from discovery.lookup.http_query import ApiError, blocking_params, parse_query
from discovery.lookup.peers import Slots


@pytest.mark.parametrize("host", [
    None, "127.0.0.1", "127.0.0.1:8500", "localhost", "LocalHost:80", "198.51.100.5",
    "[::1]", "[::1]:8500", "::1", "[fe80::1]:8500",
])
def test_ip_literals_and_localhost_are_allowed(host: str | None) -> None:
    assert host_allowed(host)


@pytest.mark.parametrize("host", [
    "", "evil.example.com", "evil.example.com:8500", "localhost.", "localhost.evil.com",
    "127.0.0.1.nip.io", "127.1", "0x7f.0.0.1", "[::1", "[::1]x", "[::1]:", "127.0.0.1:",
    "127.0.0.1:http", "127.0.0.1:123456", "[evil.com]:80", "[fe80::1%eth0]",
    "\uff11\uff12\uff17.0.0.1",
    "127.0.0.1:٨٠",
])
def test_names_and_malformed_hosts_are_refused(host: str) -> None:
    assert not host_allowed(host)


def test_presented_token() -> None:
    assert presented_token({}) is None
    assert presented_token({"x-discovery-token": " abc "}) == "abc"
    assert presented_token({"authorization": "Bearer abc"}) == "abc"
    assert presented_token({"authorization": "bearer  abc"}) == "abc"
    assert presented_token({"authorization": "Basic abc"}) is None
    both = {"x-discovery-token": "one", "authorization": "Bearer two"}
    assert presented_token(both) == "one"


def test_token_matches() -> None:
    assert token_matches("a" * 32, "a" * 32)
    assert not token_matches("a" * 31, "a" * 32)
    assert not token_matches("", "a" * 32)
    assert not token_matches("é" * 32, "a" * 32)  # non-ASCII: compared, not raised on


def test_read_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    path.write_text("  " + "k" * 40 + "\n\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert read_token(str(path)) == "k" * 40
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        read_token(str(path))
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot read it"), (b"", "fewer than 16"), (b"short\n", "fewer than 16"),
    (b"two words but long enough", "one word"), ("é".encode() * 20, "printable ASCII"),
    (b"x" * 5000, "at most 4096"), (b"tab\there-and-long-enough", "one word"),
])
def test_bad_token_files_are_config_errors(tmp_path: Path, content: bytes | None,
                                           why: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=why) as info:
        read_token(str(path))
    message = str(info.value)
    assert "--http-token-file" in message and "DISCOVERY_HTTP_TOKEN_FILE" in message
    if content and len(content) >= 16:
        assert content[:16].decode(errors="replace") not in message  # never the token itself


def test_a_directory_is_not_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"regular file|cannot read"):
        read_token(str(tmp_path))


def test_blocking_slots_cap_total_and_per_client() -> None:
    slots = Slots(total=3, per_client=2, what="blocking queries")
    assert slots.acquire("a") is None and slots.acquire("a") is None
    refused = slots.acquire("a")
    assert refused is not None and "from a (2 at once)" in refused.message
    assert slots.acquire("b") is None
    refused = slots.acquire("c")
    assert refused is not None and "blocking queries at once (3)" in refused.message
    slots.release("a")
    assert slots.of("a") == 1 and slots.used == 2
    assert slots.acquire("c") is None
    for client in ("a", "b", "c"):
        slots.release(client)
    assert slots.used == 0 and slots.of("a") == 0
    slots.release("zzz")  # an extra release never goes negative
    assert slots.used == 0


@pytest.mark.parametrize(("raw", "expected"), [
    ("0", 0), ("42", 42), (" 7 ", 7), ("9" * 18, int("9" * 18)), ("9" * 19, None),
    ("²", None), ("٣", None), ("\uff11", None), ("-1", None), ("1.5", None), ("", None),
    ("+3", None),
])
def test_ascii_int(raw: str, expected: int | None) -> None:
    assert ascii_int(raw) == expected


def test_dump_json_never_writes_nan() -> None:
    data = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": ("x", 2)}
    text = dump_json(data, pretty=False)
    assert b"NaN" not in text and b"Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": ["x", 2]}
    assert dump_json({"z": 1, "a": [1]}, pretty=False) == b'{"a":[1],"z":1}\n'
    assert dump_json({"a": 1}, pretty=True) == b'{\n  "a": 1\n}\n'


@pytest.mark.parametrize(("query", "param"), [
    ("index=%C2%B2", "index"), ("index=%EF%BC%91", "index"), ("wait=%EF%BC%95s", "wait"),
    ("wait=%D9%A3", "wait"),
])
def test_blocking_params_refuse_non_ascii_digits(query: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        blocking_params(parse_query(query))
    assert info.value.status == 400 and info.value.param == param


def test_parse_query_limits() -> None:
    assert parse_query("a=1&b&a=2") == {"a": ["1", "2"], "b": [""]}
    with pytest.raises(ApiError, match="32"):
        parse_query("&".join(f"p{i}=1" for i in range(40)))


def test_malformed_or_long_targets_are_client_errors_on_every_path() -> None:
    from discovery.lookup.http import HttpApi
    from discovery.lookup.http_query import Request
    from discovery.model.catalog import Catalog

    asked: list[str] = []

    def maint(enable: bool, instance: str | None) -> list[str]:
        asked.append(instance or "")
        return []

    token = "t" * 40
    api = HttpApi(Catalog(), dict, None, maint=maint, token=token)
    assert api.handle("http://[::1/v1/services").status == 400  # an unclosed IPv6 literal
    long_id = "a" * 6000
    put = Request(f"/v1/agent/maint?enable=true&id={long_id}", "PUT",
                  {"x-discovery-token": token})
    assert api.handle(put).status == 414 and asked == []  # refused before the maint call
    assert api.handle(f"/v1/health?pretty={long_id}").status == 414
