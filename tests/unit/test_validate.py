"""discovery.model.validate: every outside value passes one of these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from discovery.errors import ValidationError
from discovery.model import validate as v

CONTROL = ["\n", "\r", "\x00", "\x1b", "\t", "\x7f", "\x85", "\u2028", "\u2029"]

GOOD: list[tuple[Callable[..., Any], Any, Any]] = [
    (v.dns_label, "web", "web"),
    (v.dns_label, "a", "a"),
    (v.dns_label, "0", "0"),
    (v.dns_label, "web-1", "web-1"),
    (v.dns_label, "a" * 63, "a" * 63),
    (v.port, 1, 1),
    (v.port, 65535, 65535),
    (v.port, "80", 80),
    (v.port, " 8080 ", 8080),
    (v.weight, 0, 0),
    (v.weight, 256, 256),
    (v.weight, "100", 100),
    (v.address, "192.0.2.1", "192.0.2.1"),
    (v.address, "::1", "::1"),
    (v.address, "2001:DB8::0001", "2001:db8::1"),
    (v.address, "2001:db8::ffff:1", "2001:db8::ffff:1"),
    (v.bind_address, "0.0.0.0", "0.0.0.0"),
    (v.bind_address, "::", "::"),
    (v.bind_address, "::1", "::1"),
    (v.tags, ["b", "a", "b"], ("a", "b")),
    (v.tags, [], ()),
    (v.tags, [f"t{i}" for i in range(v.MAX_TAGS)], tuple(sorted(f"t{i}" for i in range(32)))),
    (v.meta, {"b": "2", "A.b_c-d": 'x y "q" café'}, {"A.b_c-d": 'x y "q" café', "b": "2"}),
    (v.meta, {"k": ""}, {"k": ""}),
    (v.meta, {"k": "x" * v.MAX_VALUE}, {"k": "x" * v.MAX_VALUE}),
    (v.instance_id, "node1:3f2a3f2a3f2a:80", "node1:3f2a3f2a3f2a:80"),
    (v.instance_id, "a.b_c-d", "a.b_c-d"),
    (v.text, "web-1 (nginx:1.25) ✓", "web-1 (nginx:1.25) ✓"),
    (v.text, "", ""),
]


@pytest.mark.parametrize(
    ("fn", "value", "want"), GOOD, ids=[f"{f.__name__}-{str(x)[:20]}" for f, x, _ in GOOD]
)
def test_good(fn: Callable[..., Any], value: Any, want: Any) -> None:
    assert fn("field", value) == want


BAD: list[tuple[Callable[..., Any], Any, str]] = [
    (v.dns_label, "", "not a DNS label"),
    (v.dns_label, "Web", "not a DNS label"),
    (v.dns_label, "web_1", "not a DNS label"),
    (v.dns_label, "web.app", "not a DNS label"),
    (v.dns_label, "-web", "not a DNS label"),
    (v.dns_label, "web-", "not a DNS label"),
    (v.dns_label, "a" * 64, "not a DNS label"),
    (v.dns_label, "wéb", "not a DNS label"),
    (v.dns_label, "web\n", "control character 0x0a"),
    (v.dns_label, "x" * 10_000, "value too long"),
    (v.port, 0, "not in 1..65535"),
    (v.port, 65536, "not in 1..65535"),
    (v.port, -1, "not in 1..65535"),
    (v.port, True, "not in 1..65535"),
    (v.port, 80.0, "not in 1..65535"),
    (v.port, "http", "not a number"),
    (v.port, "-80", "not a number"),
    (v.port, "8 0", "not a number"),
    (v.port, "", "not a number"),
    (v.port, "80\n", "control character"),
    (v.weight, 257, "not in 0..256"),
    (v.weight, -1, "not in 0..256"),
    (v.weight, False, "not in 0..256"),
    (v.weight, "1.5", "not a number"),
    (v.address, "localhost", "not an IP address"),
    (v.address, "192.0.2.256", "not an IP address"),
    (v.address, "192.0.2.1\n", "control character"),
    (v.address, "", "not an IP address"),
    (v.address, "::1%lo]:25080 init-addr none backup cookie [", "scope ids are not allowed"),
    (v.address, "fe80::1%eth0", "scope ids are not allowed"),
    (v.address, "0.0.0.0", "not a unicast address"),
    (v.address, "::", "not a unicast address"),
    (v.address, "224.0.0.1", "not a unicast address"),
    (v.address, "ff02::1", "not a unicast address"),
    (v.address, "255.255.255.255", "not a unicast address"),
    (v.address, "fe80::1", "link-local address"),
    (v.address, "169.254.169.254", "link-local address"),
    (v.bind_address, "fe80::1%lo backup", "scope ids are not allowed"),
    (v.bind_address, "239.1.1.1", "cannot be listened on"),
    (v.tags, ["ok", "Not Ok"], "not a DNS label"),
    (v.tags, [f"t{i}" for i in range(v.MAX_TAGS + 1)], "too many tags"),
    (v.meta, {"a b": "x"}, "meta key"),
    (v.meta, {"": "x"}, "meta key"),
    (v.meta, {"k" * 65: "x"}, "meta key"),
    (v.meta, {"ключ": "x"}, "meta key"),
    (v.meta, {"k": 1}, "must be a string"),
    (v.meta, {1: "x"}, "meta key"),
    (v.meta, {"k": "x" * (v.MAX_VALUE + 1)}, "value too long"),
    (v.meta, {f"k{i}": "v" for i in range(v.MAX_META + 1)}, "too many meta keys"),
    (v.instance_id, "", "not a valid instance id"),
    (v.instance_id, "Node:1", "not a valid instance id"),
    (v.instance_id, "a/b", "not a valid instance id"),
    (v.instance_id, "a" * 202, "not a valid instance id"),
    (v.text, 5, "must be a string"),
    (v.text, "x" * (v.MAX_VALUE + 1), "value too long"),
]


@pytest.mark.parametrize(
    ("fn", "value", "reason"), BAD, ids=[f"{f.__name__}-{str(x)[:20]!r}" for f, x, _ in BAD]
)
def test_bad(fn: Callable[..., Any], value: Any, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        fn("field", value)
    assert reason in info.value.reason
    assert info.value.culprit.startswith("field")
    assert len(str(info.value)) < 300  # a hostile value is never echoed at length


@pytest.mark.parametrize("ch", CONTROL, ids=repr)
@pytest.mark.parametrize(
    "fn", [v.dns_label, v.address, v.instance_id, v.text], ids=lambda f: f.__name__
)
def test_control_characters(fn: Callable[[str, str], Any], ch: str) -> None:
    with pytest.raises(ValidationError, match="control character"):
        fn("field", f"a{ch}b")


@pytest.mark.parametrize("ch", CONTROL, ids=repr)
def test_control_characters_in_meta_values(ch: str) -> None:
    with pytest.raises(ValidationError) as info:
        v.meta("meta", {"k": f"a{ch}b"})
    assert info.value.culprit == "meta.k"


@pytest.mark.parametrize("fn", [v.port, v.weight], ids=lambda f: f.__name__)
def test_non_ascii_digits(fn: Callable[[str, str], int]) -> None:
    with pytest.raises(ValidationError):
        fn("field", "²")


def test_meta_key_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        v.meta("meta", {"k\n": "v"})


def test_endpoint_holds_only_a_plain_unicast_ip_object() -> None:
    import ipaddress

    from discovery.model.endpoint import Endpoint

    assert str(Endpoint.parse("x", "2001:DB8::1", 80)) == "[2001:db8::1]:80"
    assert str(Endpoint.parse("x", "192.0.2.1", 80)) == "192.0.2.1:80"
    hostile = "::1%lo]:25080 init-addr none backup cookie ["
    with pytest.raises(ValidationError, match="scope ids"):
        Endpoint.parse("x", hostile, 80)
    with pytest.raises(ValidationError, match="scope ids"):
        Endpoint(ipaddress.IPv6Address(hostile), 80)  # not even by building it directly
    with pytest.raises(ValidationError, match="IP address object"):
        Endpoint("192.0.2.1 backup", 80)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"1\.\.65535"):
        Endpoint(ipaddress.IPv4Address("192.0.2.1"), 99999)
