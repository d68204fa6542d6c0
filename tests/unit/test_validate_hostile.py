"""Hostile registry values in log lines and as addresses: validate.shown (escaped, shortened,
idempotent), the port/weight errors that name a value, and the addresses refused as an
instance's (link-local, metadata, reserved, "this network"). No routing: validation only."""

from __future__ import annotations

import ipaddress

import pytest

from discovery.errors import ValidationError
from discovery.model import validate as v
from discovery.model.endpoint import Endpoint

FORGED = ("/discovery/services/walkeb/evil\n2026-12-04 20:40:00,000 INFO "
          "discovery.watcher.core: FORGED LOG LINE")
HOSTILE = [FORGED, "a\rb", "x\x1b[31mred\x1b[0m", "abc\u202eexe.txt", "zero\u200bwidth",
           "line\u2028sep", "nul\x00", "tab\there", "\ud800", "\x85next", "\U000e0041tag"]


@pytest.mark.parametrize("value", HOSTILE)
def test_shown_escapes_every_unprintable_character(value: str) -> None:
    out = v.shown(value)
    assert out.isprintable()
    assert "\n" not in out and "\u202e" not in out and "\u200b" not in out
    assert v.shown(out) == out  # idempotent: every layer may apply it


def test_shown_names_the_forged_line_on_one_line() -> None:
    assert v.shown(FORGED) == FORGED.replace("\n", "\\n")
    assert v.shown("abc\u202eexe") == "abc\\u202eexe"
    assert v.shown("\x1b[31m") == "\\x1b[31m"


def test_shown_leaves_plain_values_alone() -> None:
    for plain in ("/discovery/services/web/n1:abc:80", "café ✓", "", "x" * v.SHOWN_MAX):
        assert v.shown(plain) == plain


@pytest.mark.parametrize("value", ["k" * 200_000, "\u202e" * 5000, "x" * 199 + "\n",
                                   "\U0010ffff" * 300])
def test_shown_is_short_with_a_marker_and_the_full_length(value: str) -> None:
    out = v.shown(value)
    assert len(out) <= v.SHOWN_MAX and out.isprintable()
    assert out.endswith(f"...({len(value)} chars)")
    assert v.shown(out) == out
    assert "\\" not in out or not out.split("...(")[0].endswith(("\\", "\\u", "\\U"))


def test_shown_of_other_values_is_their_repr_shortened() -> None:
    huge = int("9" * 4000)
    out = v.shown(huge)
    assert len(out) <= v.SHOWN_MAX and out.endswith("...(4000 chars)")
    assert v.shown(80.0) == "80.0" and v.shown(["a\nb"]) == "['a\\nb']"


@pytest.mark.parametrize("fn", [v.port, v.weight])
def test_a_huge_number_is_not_logged_whole(fn: object) -> None:
    huge = int("7" * 4000)
    with pytest.raises(ValidationError) as info:
        fn("port", huge)  # type: ignore[operator]
    assert len(str(info.value)) < 200 and "(4000 chars)" in str(info.value)


REFUSED = [
    ("169.254.169.254", "link-local"),  # the cloud metadata endpoint
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("febf:ffff::1", "link-local"),
    ("::ffff:169.254.169.254", "link-local"),  # IPv4-mapped reaches its IPv4 address
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 (RFC 6052) reaches it too
    ("::ffff:0:a9fe:a9fe", "link-local"),  # SIIT's IPv4-translated
    ("64:ff9b::6464:64c8", "metadata"),  # 100.100.100.200 behind a NAT64
    ("240.0.0.1", "reserved"),
    ("254.255.255.254", "reserved"),
    ("0.1.2.3", "this network"),
    ("0.255.255.255", "this network"),
    ("::ffff:0.0.0.0", "not a unicast address"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_link_local_reserved_and_metadata_addresses_are_refused(address: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        v.address("address", address)
    assert why in info.value.reason and info.value.culprit == "address"
    with pytest.raises(ValidationError, match=why):
        Endpoint.parse("web", address, 80)


#: one address of each RFC 1918 range (10/8, 172.16/12, 192.168/16): a fleet's instances have
#: them. Validated here, never contacted; made from their numbers, so that no test names a
#: private-range address (the tests send traffic to loopback alone)
RFC1918 = [str(ipaddress.IPv4Address(n)) for n in (0x0A000001, 0xAC100504, 0xC0A80101)]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1",
                                     *RFC1918, "100.64.0.1",
                                     "192.0.2.1", "8.8.8.8", "2001:db8::1", "fd00::1",
                                     "fec0::1"])
def test_loopback_private_and_public_unicast_stay_allowed(address: str) -> None:
    assert v.address("address", address)


def test_the_error_names_the_value() -> None:
    with pytest.raises(ValidationError, match=r"'169\.254\.169\.254' is a link-local"):
        v.address("address", "169.254.169.254")
