"""The one decode path (registry.decoder.Decoder): every malformed value is skipped with one
warning naming its key, at most once per key a minute, counted; nothing ever escapes."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.model import Instance
from discovery.registry.decoder import QUIET_S, Decoder
from discovery.registry.url import RegistryURL

URL = RegistryURL.parse("zk://h/p")
KEY = "/p/services/web/n1:abc:80"
LOGGER = "discovery.registry.decoder"


def _inst(**kw: object) -> Instance:
    fields: dict[str, object] = dict(service="web", id="n1:abc:80", node="n1",
                                     address="192.0.2.5", port=80, tags=("a", "b"),
                                     meta={"k": "v"}, registered_at=12.5)
    fields.update(kw)
    return Instance(**fields)  # type: ignore[arg-type]


def _raw(**changes: object) -> bytes:
    data = _inst().to_dict()
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    return json.dumps(data).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_trip() -> None:
    inst = _inst()
    assert Decoder(URL).decode(KEY, inst.to_json()) == inst
    assert Instance.from_json(inst.to_json().decode()) == inst


MALFORMED = [
    (b"\x00\xffgarbage", "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (_raw(port=None), "missing field"),
    (_raw(port="80"), "integers"),
    (_raw(port=0), "port"),
    (_raw(weight=1.5), "integers"),
    (_raw(tags="a"), "tags"),
    (_raw(tags=["ok", "Not A Label"]), "tags"),
    (_raw(state="gone"), "up|draining"),
    (_raw(schema=99), "newer"),
    (_raw(schema=-5), "positive integer"),
    (_raw(service="Web"), "service"),
    (_raw(id="other:id:80"), "holds"),  # valid record, but stored under the wrong key
    (_raw(service="api"), "holds"),
    (_raw().replace(b'"schema": 1,', b'"schema": 1e400,'), "not JSON"),
    (_raw().replace(b'"registered_at": 12.5', b'"registered_at": NaN'), "not JSON"),
    (_raw().replace(b'"registered_at": 12.5', b'"registered_at": 12.5, "seen_at": Infinity'),
     "not JSON"),
    (_raw().replace(b'"registered_at": 12.5', b'"registered_at": 12.5, "written_at": "x"'),
     "written_at"),
    # an integer too large for a float: named as any bad stamp, not an OverflowError
    (_raw().replace(b'"registered_at": 12.5', b'"registered_at": 1' + b"0" * 400),
     "registered_at must be a finite number"),
    (b"[" * 50_000 + b"]" * 50_000, "too large"),
    (b"[" * 1000 + b"]" * 1000, "nested deeper"),
    (_raw(address="::1%lo]:25080 init-addr none backup cookie ["), "scope ids"),
    (_raw(address="0.0.0.0"), "not a unicast address"),
    (_raw(address="::"), "not a unicast address"),
    (_raw(address="224.0.0.1"), "not a unicast address"),
    (_raw(address="ff02::1"), "not a unicast address"),
    (_raw(zone="Zone A"), "zone"),
    (_raw(zone=7), "zone must be a string"),
    (_raw(zone="a\u2028b"), "zone"),
    # a member twice (parsers disagree on which wins), a record not in UTF-8
    (_raw().replace(b'"port": 80,', b'"port": 80, "port": 8080,'), "given twice"),
    (_raw().decode().encode("utf-16-le"), "not JSON"),
]


@pytest.mark.parametrize(("raw", "why"), MALFORMED)
def test_malformed_is_skipped_with_one_warning_and_counted(
        raw: bytes, why: str, caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder(URL)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert decoder.decode(KEY, raw) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert KEY in warnings[0].getMessage()
    assert why in warnings[0].getMessage()
    assert decoder.skipped == 1


def test_a_bad_key_is_named_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    decoder = Decoder(URL, clock=clock)
    other = "/p/services/web/n2:abc:80"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(50):  # a resync every second, say
            assert decoder.decode(KEY, b"{") is None
            clock.now += 1.0
        assert decoder.decode(other, b"{") is None  # another key is named at once
        clock.now += QUIET_S
        assert decoder.decode(KEY, b"{") is None
    named = [r.getMessage() for r in caplog.records]
    assert [KEY in m for m in named] == [True, False, True]
    assert decoder.skipped == 52  # every skip counts, logged or not


def test_missing_value_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert Decoder(URL).decode(KEY, None) is None
    assert KEY in caplog.text


def test_keys_outside_the_layout_are_ignored_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder(URL)
    with caplog.at_level(logging.WARNING):
        assert decoder.decode("/p/services/web", b"garbage") is None
        assert decoder.decode("/p/other/web/x", _inst().to_json()) is None
    assert caplog.records == []
    assert decoder.skipped == 0


def test_optional_fields_have_defaults() -> None:
    raw = json.dumps({"service": "web", "id": "n1:abc:80", "node": "n1",
                      "address": "192.0.2.5", "port": 80}).encode()
    inst = Decoder(URL).decode(KEY, raw)
    assert inst is not None
    assert (inst.weight, inst.tags, inst.meta, inst.state.value) == (100, (), {}, "up")
    assert inst.zone == ""


def test_zone_decodes() -> None:
    inst = Decoder(URL).decode(KEY, _raw(zone="eu-west-1a"))
    assert inst is not None and inst.zone == "eu-west-1a"


# -- property: no exception escapes, and nothing unusable crosses a process ----------------

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_ANY = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
FIELDS = st.sampled_from(["schema", "service", "id", "node", "address", "port", "tags",
                          "weight", "meta", "state", "registered_at", "image", "seen_at",
                          "written_at", "zone"])


def _checked(inst: Instance | None) -> None:
    if inst is None:
        return
    text = inst.to_json()  # what we would serve or forward: strict JSON, and it round-trips
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in output"))
    assert Decoder(URL).decode(KEY, text) == inst
    assert math.isfinite(inst.registered_at)
    assert math.isfinite(inst.seen_at) and math.isfinite(inst.written_at)
    assert isinstance(inst.schema, int) and inst.schema >= 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_skip(raw: bytes) -> None:
    _checked(Decoder(URL).decode(KEY, raw))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FIELDS, JSON_ANY, max_size=6))
def test_any_field_values_decode_or_skip(changes: dict[str, Any]) -> None:
    data = _inst().to_dict() | changes
    raw = json.dumps(data, allow_nan=True).encode()
    _checked(Decoder(URL).decode(KEY, raw))
