"""discovery.model.Instance: round trip, and every malformed record is an InvalidRecord."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from discovery.errors import InvalidRecord, ValidationError
from discovery.model import SCHEMA_VERSION, Instance, State, make_instance_id
from discovery.model.instance import made_on


def instance(**kw: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": "web",
        "id": "node1:3f2a3f2a3f2a:80",
        "node": "node1",
        "address": "192.0.2.5",
        "port": 32768,
        "tags": ("a", "b"),
        "weight": 50,
        "meta": {"version": "1.2", "note": 'quotes " and café'},
        "container_id": "3f2a" * 16,
        "container_name": "web-1",
        "image": "nginx:1.25",
        "registered_at": 1700000000.5,
    }
    fields.update(kw)
    return Instance(**fields)


def record(**kw: Any) -> dict[str, Any]:
    data = instance().to_dict()
    for k, val in kw.items():
        if val is DROP:
            data.pop(k)
        else:
            data[k] = val
    return data


DROP = object()


def test_round_trip() -> None:
    inst = instance()
    raw = inst.to_json()
    assert Instance.from_json(raw) == inst
    assert Instance.from_json(raw.decode()) == inst
    assert Instance.from_dict(json.loads(raw)) == inst
    assert json.loads(raw)["state"] == "up" and json.loads(raw)["schema"] == SCHEMA_VERSION


def test_round_trip_draining_and_ipv6() -> None:
    inst = instance(address="2001:db8::1", state=State.DRAINING, tags=(), meta={})
    assert Instance.from_json(inst.to_json()) == inst


def test_to_json_is_canonical() -> None:
    assert instance().to_json() == instance().to_json()
    assert b" " not in instance(meta={}).to_json()


def test_defaults_for_optional_fields() -> None:
    minimal = {"service": "web", "id": "n:1:80", "node": "n", "address": "192.0.2.1", "port": 80}
    inst = Instance.from_dict(minimal)
    assert (inst.tags, inst.weight, inst.meta, inst.state, inst.registered_at) == (
        (),
        100,
        {},
        State.UP,
        0.0,
    )


def test_from_dict_normalises_tags() -> None:
    assert Instance.from_dict(record(tags=["b", "a", "b"])).tags == ("a", "b")


def test_helpers() -> None:
    inst = instance()
    assert inst.key == ("web", "node1:3f2a3f2a3f2a:80")
    assert inst.with_state(State.DRAINING).state is State.DRAINING
    assert inst.same_registration(instance(registered_at=1.0))
    assert not inst.same_registration(instance(weight=51))
    assert make_instance_id("node1", "3F2A" * 16, 80) == "node1:3f2a3f2a3f2a:80"


def test_made_on_takes_the_ids_the_agent_of_that_node_gives_and_no_other() -> None:
    ours = made_on("node1")
    assert ours(make_instance_id("node1", "3F2A" * 16, 65535))
    assert not any(ours(iid) for iid in [
        make_instance_id("node12", "3F2A" * 16, 80), "node1:web", "node1:3f2a3f2a3f2a",
        "node1:3f2a3f2a3f2a:80:9", "node1:3F2A3F2A3F2A:80", "xnode1:3f2a3f2a3f2a:80",
        "node1:3f2a3f2a3f2a:123456"])


MALFORMED_JSON = [b"", b"{", b"not json", b"\xff\xfe", "{'service': 'web'}", b"[1,2"]


@pytest.mark.parametrize("raw", MALFORMED_JSON)
def test_not_json(raw: bytes | str) -> None:
    with pytest.raises(InvalidRecord, match="not JSON"):
        Instance.from_json(raw, where="/discovery/web/x")


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b'"web"', b"true"])
def test_not_object(raw: bytes) -> None:
    with pytest.raises(InvalidRecord, match="not a JSON object"):
        Instance.from_json(raw)


BAD_FIELDS = [
    ("missing service", {"service": DROP}, "missing field"),
    ("missing port", {"port": DROP}, "missing field"),
    ("missing address", {"address": DROP}, "missing field"),
    ("port as string", {"port": "80"}, "port and weight must be integers"),
    ("port float", {"port": 80.0}, "port and weight must be integers"),
    ("port zero", {"port": 0}, "not in 1..65535"),
    ("port bool", {"port": True}, "port and weight must be integers"),
    ("weight string", {"weight": "1"}, "port and weight must be integers"),
    ("weight too big", {"weight": 1000}, "not in 0..256"),
    ("tags not a list", {"tags": "a,b"}, "tags must be a list"),
    ("meta not an object", {"meta": ["a"]}, "meta an object"),
    ("bad tag", {"tags": ["ok", "NOT OK"]}, "not a DNS label"),
    ("meta value not a string", {"meta": {"k": 1}}, "meta value must be a string"),
    ("meta value with newline", {"meta": {"k": "a\nb"}}, "control character"),
    ("meta key", {"meta": {"a b": "x"}}, "meta key"),
    ("service", {"service": "Web"}, "not a DNS label"),
    ("service as object", {"service": {"a": 1}}, "service must be a string"),
    ("node", {"node": "node_1"}, "not a DNS label"),
    ("id", {"id": "x/y"}, "not a valid instance id"),
    ("address", {"address": "example.com"}, "not an IP address"),
    ("address injection", {"address": "192.0.2.1\nserver evil 6.6.6.6:80"}, "control character"),
    ("container name", {"container_name": "a\u2028b"}, "control character"),
    ("image too long", {"image": "x" * 10_000}, "value too long"),
    ("state", {"state": "down"}, "is not up|draining"),
    ("schema newer", {"schema": SCHEMA_VERSION + 1}, "is newer than"),
    ("schema not a number", {"schema": "one"}, "schema must be a positive integer"),
    ("schema negative", {"schema": -5}, "schema must be a positive integer"),
    ("schema float", {"schema": 1.0}, "schema must be a positive integer"),
    ("schema bool", {"schema": True}, "schema must be a positive integer"),
    ("tag not a string", {"tags": [1]}, "tags must be strings"),
    ("state not a string", {"state": 1}, "state must be a string"),
    ("registered_at", {"registered_at": "yesterday"}, "registered_at must be a finite"),
    ("registered_at bool", {"registered_at": True}, "registered_at must be a finite"),
    ("registered_at negative", {"registered_at": -1}, "registered_at must be a finite"),
    ("registered_at huge", {"registered_at": 10**30}, "registered_at must be a finite"),
    ("seen_at text", {"seen_at": "now"}, "seen_at must be a finite"),
    ("seen_at bool", {"seen_at": False}, "seen_at must be a finite"),
    ("seen_at negative", {"seen_at": -0.5}, "seen_at must be a finite"),
    ("written_at huge", {"written_at": 1e300}, "written_at must be a finite"),
    ("written_at list", {"written_at": [1]}, "written_at must be a finite"),
    ("zone not a label", {"zone": "eu west"}, "not a DNS label"),
    ("zone upper case", {"zone": "EU-1"}, "not a DNS label"),
    ("zone injection", {"zone": "a\nserver evil 6.6.6.6:80"}, "control character"),
    ("zone number", {"zone": 1}, "zone must be a string"),
    ("zone list", {"zone": ["a"]}, "zone must be a string"),
    ("zone too long", {"zone": "z" * 64}, "not a DNS label"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS]
)
def test_bad_fields(changes: dict[str, Any], reason: str) -> None:
    raw = json.dumps(record(**changes))
    with pytest.raises(InvalidRecord) as info:
        Instance.from_json(raw, where="/discovery/web/x")
    assert reason in str(info.value)
    assert info.value.culprit.startswith("/discovery/web/x")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"tags": ("b", "a")}, "must be sorted and unique"),
        ({"tags": ("a", "a")}, "must be sorted and unique"),
        ({"state": "up"}, "is not up|draining"),
        ({"port": 0}, "not in 1..65535"),
        ({"service": ""}, "not a DNS label"),
    ],
)
def test_constructor_validates(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason.replace("|", r"\|")):
        instance(**kw)


def test_meta_key_with_newline_rejected() -> None:
    with pytest.raises(InvalidRecord):
        Instance.from_json(json.dumps(record(meta={"k\n": "v"})))


HOSTILE_RAW = [
    ("schema 1e400", b'{"schema":1e400,"service":"web"}', "not JSON"),
    ("NaN", b'{"schema":1,"registered_at":NaN}', "not JSON"),
    ("Infinity", b'{"schema":1,"registered_at":Infinity}', "not JSON"),
    ("-Infinity", b'{"registered_at":-Infinity}', "not JSON"),
    ("huge int", b'{"schema":' + b"9" * 5000 + b"}", "not JSON"),
    ("deep array", b"[" * 100_000 + b"]" * 100_000, "value too large"),
    ("deep but small", b"[" * 9 + b"]" * 9, "nested deeper than"),
    ("deep object", b'{"a":' * 20 + b"1" + b"}" * 20, "nested deeper than"),
    ("too large", b'{"image":"' + b"x" * 70_000 + b'"}', "value too large"),
    ("not utf-8", b'{"service":"\xff\xfe"}', "not JSON"),
    ("lone surrogate", b'{"service":"\\ud800"}', ""),
    ("null", b"null", "not a JSON object"),
]


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in HOSTILE_RAW],
                         ids=[c[0] for c in HOSTILE_RAW])
def test_hostile_values_are_one_invalid_record(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        Instance.from_json(raw, where="/discovery/web/x")
    assert reason in str(info.value)
    assert info.value.culprit.startswith("/discovery/web/x")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    inst = Instance.from_json(json.dumps(record(meta={"k": "[[[[[[[[[[{{{{{{{{{{ \\\" ["})))
    assert inst.meta["k"].startswith("[[[[")


def test_stage_stamps_round_trip_and_older_records_decode() -> None:
    """seen_at / written_at (propagation stages) survive JSON; records without them (older
    agents, Nerve) decode with 0 and print without them; they are not part of the registration."""
    stamped = Instance.from_json(json.dumps(record(seen_at=1700000000.25, written_at=1700000000.5)))
    assert (stamped.seen_at, stamped.written_at) == (1700000000.25, 1700000000.5)
    assert Instance.from_json(stamped.to_json()) == stamped
    old = Instance.from_json(json.dumps(record()))
    assert (old.seen_at, old.written_at) == (0.0, 0.0)
    assert "seen_at" not in old.to_dict() and "written_at" not in old.to_dict()
    assert old.same_registration(stamped)


def test_zone_round_trips_and_is_optional() -> None:
    inst = instance(zone="eu-1")
    data = json.loads(inst.to_json())
    assert data["zone"] == "eu-1"
    assert Instance.from_json(inst.to_json()) == inst
    assert "zone" not in instance().to_dict()  # older readers see the record they know
    assert Instance.from_dict(record()).zone == ""
    assert not instance(zone="eu-1").same_registration(instance(zone="eu-2"))
    with pytest.raises(ValidationError, match="not a DNS label"):
        instance(zone="-bad")


def test_decoded_instances_share_repeated_values_and_stay_equal() -> None:
    a = Instance.from_json(instance().to_json())
    b = Instance.from_json(instance(id="node1:4f2a3f2a3f2a:80", container_id="4f" * 32).to_json())
    assert a == instance() and a.to_json() == instance().to_json()
    assert a.meta is b.meta and a.tags is b.tags  # one object per distinct value
    assert a.service is b.service and a.node is b.node and a.image is b.image
    assert a.id is not b.id and a.container_id != b.container_id
    c = Instance.from_json(instance(meta={"version": "1.3"}, tags=("a",)).to_json())
    assert c.meta == {"version": "1.3"} and c.tags == ("a",) and c.meta is not a.meta
    assert not hasattr(a, "__dict__")  # slots: no per-instance dict


@pytest.mark.parametrize(("kw", "reason"), [
    ({"tags": ("Bad",)}, "not a DNS label"),
    ({"meta": {"k": "v\x00"}}, "control character"),
    ({"address": "0.0.0.0"}, "not a unicast address"),
])
def test_shared_values_are_remembered_only_once_valid(kw: dict[str, Any], reason: str) -> None:
    """A shared tags tuple, meta dict or address is not checked again (decoding a fleet's
    records costs half as much): so a value that failed is never remembered, and fails again."""
    fields = {f.name: getattr(instance(), f.name) for f in dataclasses.fields(Instance)}
    for _ in range(2):
        with pytest.raises(ValidationError, match=reason):
            Instance.shared(**{**fields, **kw})
    a, b = Instance.shared(**fields), Instance.shared(**fields)
    assert a.tags is b.tags and a.meta is b.meta and a == instance()


def test_a_large_meta_dict_is_not_remembered() -> None:
    """Up to ``SHARED_MAX`` meta dicts are shared; of the largest valid ones (64 values of
    512 characters) that cache held ~45 MB on every watcher, filled by one record written
    again with changing values. Only those of at most ``SHARED_META_CHARS`` are shared."""
    from discovery.model import instance as instance_mod

    fields = {f.name: getattr(instance(), f.name) for f in dataclasses.fields(Instance)}
    big = {f"k{n}": "v" * 512 for n in range(64)}
    assert Instance.shared(**{**fields, "meta": big}).meta == big
    assert tuple(big.items()) not in instance_mod._shared_meta
    small = {"version": "1.2"}
    c, d = (Instance.shared(**{**fields, "meta": dict(small)}) for _ in range(2))
    assert c.meta is d.meta  # still one object per distinct small value
