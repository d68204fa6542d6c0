"""RegistryURL parsing and the decoding of stored instance records (base.decode)."""

from __future__ import annotations

import json
import logging

import pytest

from discovery.errors import ConfigError
from discovery.model import Instance
from discovery.registry.base import DEFAULT_PREFIX, RegistryURL, decode


@pytest.mark.parametrize(
    ("url", "scheme", "hosts", "prefix"),
    [
        ("etcd://h1", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("zk://h1", "zk", (("h1", 2181),), DEFAULT_PREFIX),
        ("ETCD://h1:1234", "etcd", (("h1", 1234),), DEFAULT_PREFIX),
        ("etcd://h1:2379/", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("etcd://h1//", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("etcd://a:1,b:2,c/x", "etcd", (("a", 1), ("b", 2), ("c", 2379)), "/x"),
        ("zk://10.0.0.1:2181,10.0.0.2:2182/a/b/", "zk",
         (("10.0.0.1", 2181), ("10.0.0.2", 2182)), "/a/b"),
        ("zk://[::1]:2181/p", "zk", (("::1", 2181),), "/p"),
        ("zk://[::1]/p", "zk", (("::1", 2181),), "/p"),
        ("etcd://[fe80::1]:1,h:2/p", "etcd", (("fe80::1", 1), ("h", 2)), "/p"),
        ("etcd://h:65535/t-1_a.b", "etcd", (("h", 65535),), "/t-1_a.b"),
    ],
)
def test_parse_good(url: str, scheme: str, hosts: tuple[tuple[str, int], ...],
                    prefix: str) -> None:
    parsed = RegistryURL.parse(url)
    assert (parsed.scheme, parsed.hosts, parsed.prefix) == (scheme, hosts, prefix)
    assert RegistryURL.parse(str(parsed)) == parsed  # str() is a URL that parses back


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("", "empty"),
        ("http://h:2379", "scheme"),
        ("h:2379", "scheme"),
        ("etcd://", "empty host"),
        ("etcd://h,,k", "empty host"),
        ("etcd://h,", "empty host"),
        ("etcd://h:0", "bad host:port"),
        ("etcd://h:65536", "bad host:port"),
        ("etcd://h:x", "bad host:port"),
        ("etcd://h:-1", "bad host:port"),
        ("zk://:2181", "bad host:port"),
        ("etcd://h/a b", "bad prefix"),
        ("etcd://h/a//b", "bad prefix"),
    ],
)
def test_parse_bad(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        RegistryURL.parse(url)
    assert complaint in str(err.value)


def test_keys() -> None:
    url = RegistryURL.parse("etcd://h/p")
    assert url.service_dir("web") == "/p/services/web"
    assert url.key("web", "n1:abc:80") == "/p/services/web/n1:abc:80"
    assert url.split_key("/p/services/web/n1:abc:80") == ("web", "n1:abc:80")
    for other in ["/p/services/web", "/p/services/web/", "/p/services//x", "/q/services/web/x",
                  "/p/services/web/x/y", "/p/servicesx/web/x", "/p/other/web/x"]:
        assert url.split_key(other) is None, other


URL = RegistryURL.parse("zk://h/p")
KEY = "/p/services/web/n1:abc:80"


def _inst(**kw: object) -> Instance:
    fields: dict[str, object] = dict(service="web", id="n1:abc:80", node="n1",
                                     address="10.0.0.5", port=80, tags=("a", "b"),
                                     meta={"k": "v"}, registered_at=12.5)
    fields.update(kw)
    return Instance(**fields)  # type: ignore[arg-type]


def test_decode_round_trip() -> None:
    inst = _inst()
    assert decode(URL, KEY, inst.to_json()) == inst
    assert Instance.from_json(inst.to_json().decode()) == inst


def _raw(**changes: object) -> bytes:
    data = _inst().to_dict()
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x00\xffgarbage", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (_raw(port=None), "missing or bad field"),
        (_raw(port="80"), "integers"),
        (_raw(port=0), "port"),
        (_raw(weight=1.5), "integers"),
        (_raw(tags="a"), "tags"),
        (_raw(tags=["ok", "Not A Label"]), "tags"),
        (_raw(state="gone"), ""),
        (_raw(schema=99), "newer"),
        (_raw(service="Web"), "service"),
        (_raw(id="other:id:80"), "holds"),  # valid record, but stored under the wrong key
        (_raw(service="api"), "holds"),
    ],
)
def test_decode_malformed_is_skipped_with_one_warning(
        raw: bytes, why: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="discovery.registry.base"):
        assert decode(URL, KEY, raw) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert KEY in warnings[0].getMessage()
    assert why in warnings[0].getMessage()


def test_decode_missing_value_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert decode(URL, KEY, None) is None
    assert KEY in caplog.text


def test_decode_ignores_keys_outside_the_layout_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert decode(URL, "/p/services/web", b"garbage") is None
        assert decode(URL, "/p/other/web/x", _inst().to_json()) is None
    assert caplog.records == []


def test_decode_defaults_optional_fields() -> None:
    raw = json.dumps({"service": "web", "id": "n1:abc:80", "node": "n1",
                      "address": "10.0.0.5", "port": 80}).encode()
    inst = decode(URL, KEY, raw)
    assert inst is not None
    assert (inst.weight, inst.tags, inst.meta, inst.state.value) == (100, (), {}, "up")
