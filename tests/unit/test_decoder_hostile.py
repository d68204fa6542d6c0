"""Registry keys and values are anyone's text: what the decoder, etcd_read and the ZooKeeper
modules log of them is one line, escaped and short; what the decoder remembers of a key to
rate-limit its warning is bounded in bytes. And a record with a link-local or metadata address
is skipped. No server, no routing."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from discovery.model import Instance
from discovery.registry import etcd_read
from discovery.registry.decoder import Decoder
from discovery.registry.url import RegistryURL

ETCD = RegistryURL.parse("etcd://127.0.0.1:2379/discovery")
NERVE = RegistryURL.parse("zk://127.0.0.1:2181/nerve?format=nerve")
FORGED = "\n2026-12-04 20:40:00,000 INFO discovery.watcher.core: FORGED LOG LINE"


def _record(service: str, instance_id: str, **changes: Any) -> bytes:
    inst = Instance(service=service, id=instance_id, node="n1", address="127.0.0.1", port=80)
    return json.dumps(inst.to_dict() | changes).encode()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def _safe(line: str, limit: int = 1200) -> bool:
    return line.isprintable() and len(line) <= limit


def test_a_key_with_a_newline_forges_no_log_line(caplog: pytest.LogCaptureFixture) -> None:
    key = f"/discovery/services/walkeb/evil{FORGED}"
    with caplog.at_level(logging.WARNING):
        assert Decoder(ETCD).decode(key, _record("walkeb", "good:1:80")) is None
    (line,) = _lines(caplog)
    assert _safe(line) and "FORGED LOG LINE" in line and "evil\\n2026" in line


@pytest.mark.parametrize("tail", ["\x1b[2J\x1b[31mred", "gnp.\u202eexe", "a\u200bb", "\x85x"])
def test_escapes_and_bidi_in_a_key_are_escaped(tail: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Decoder(ETCD).decode(f"/discovery/services/web/{tail}", b"{")
        Decoder(ETCD).decode(f"/discovery/services/web/{tail}", None)
    assert len(_lines(caplog)) == 2 and all(_safe(line) for line in _lines(caplog))


def test_a_huge_key_is_logged_short_and_remembered_small(
        caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder(ETCD)
    keys = [f"/discovery/services/web/{i}" + "k" * 200_000 for i in range(20)]
    with caplog.at_level(logging.WARNING):
        for key in keys:
            decoder.decode(key, b"{")
            decoder.decode(key, _record("web", "other:1:80"))  # the wrong key: "holds"
    lines = _lines(caplog)
    assert len(lines) == 20  # the second of each is rate-limited, as before
    assert all(len(line) < 600 and "chars)" in line for line in lines)
    remembered = sum(sys.getsizeof(k) for k in decoder._warned)
    assert remembered < 20 * 200  # a digest each, not 200 KB each


def test_a_huge_port_is_not_logged_whole(caplog: pytest.LogCaptureFixture) -> None:
    raw = _record("web", "n1:1:80").replace(b'"port": 80', b'"port": ' + b"9" * 4000)
    with caplog.at_level(logging.WARNING):
        assert Decoder(ETCD).decode("/discovery/services/web/n1:1:80", raw) is None
    (line,) = _lines(caplog)
    assert len(line) < 600 and "(4000 chars)" in line


def test_a_nerve_node_name_is_escaped_too(caplog: pytest.LogCaptureFixture) -> None:
    raw = json.dumps({"host": "127.0.0.1", "port": "x", "name": "web"}).encode()
    with caplog.at_level(logging.WARNING):
        Decoder(NERVE).decode(f"/nerve/web/n\u202e{FORGED}_0000000001", raw)
    (line,) = _lines(caplog)
    assert _safe(line)


@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "240.1.2.3", "0.0.0.7"])
def test_a_record_with_a_link_local_or_reserved_address_is_skipped(
        address: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert Decoder(ETCD).decode("/discovery/services/web/n1:1:80",
                                    _record("web", "n1:1:80", address=address)) is None
    (line,) = _lines(caplog)
    assert repr(address) in line and "not allowed as an instance's address" in line


def test_etcd_read_names_an_oversized_key_escaped_and_short(
        caplog: pytest.LogCaptureFixture) -> None:
    key = f"/discovery/services/web/x{FORGED}\u202e".encode() + b"k" * 200_000
    kvs = [SimpleNamespace(key=key, value=b"v" * 100)]
    stats = SimpleNamespace(add=lambda *a: None)
    with caplog.at_level(logging.WARNING):
        etcd_read._Reading(lambda k, v: None, None, 10, stats).take(kvs, {})  # type: ignore[arg-type]
    (line,) = _lines(caplog)
    assert _safe(line, 400) and "100 bytes" in line


def test_zookeeper_path_denied_is_named_escaped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Decoder(NERVE).denied(f"/nerve/services/web{FORGED}\u202e" + "p" * 100_000)
    (line,) = _lines(caplog)
    assert _safe(line) and "NoAuth" in line


def test_etcd_prefix_denied_is_named_escaped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Decoder(RegistryURL.parse("etcd://127.0.0.1:2379/discovery")).denied(
            f"/discovery/services/web{FORGED}\u202e/" + "p" * 100_000)
    (line,) = _lines(caplog)
    assert _safe(line) and "permission denied" in line
