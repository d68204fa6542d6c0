"""discovery.agent.labels: hostile labels -> a LabelError; never anything but specs or one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.agent.labels import parse_container
from discovery.errors import LabelError, ValidationError
from discovery.model import Instance, make_instance_id
from tests.unit.test_labels import CID, WHO, container

# ---- errors: hostile values, keys and names ------------------------------------------

HOSTILE = [
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\x1b[31mb",
    "a\u2028b",
    "a\u2029b",
    "a\x85b",
    "a\x7fb",
    "a\tb",
    "x" * 10_000,
]

FIELDS = [
    "discovery.service",
    "discovery.port",
    "discovery.tags",
    "discovery.weight",
    "discovery.meta.k",
    "discovery.check",
    "discovery.check.path",
    "discovery.check.x",
    "discovery.80.service",
    "discovery.80.tags",
    "discovery.ignore",
    "SERVICE_NAME",
    "SERVICE_TAGS",
    "SERVICE_REGION",
    "SERVICE_80_NAME",
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:12]))
@pytest.mark.parametrize("key", FIELDS)
def test_hostile_values_rejected(key: str, value: str) -> None:
    labels = {"discovery.service": "web", key: value}
    with pytest.raises(LabelError) as info:
        parse_container(container(labels))
    assert info.value.culprit == f"{WHO} label {key}"
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("value", [*HOSTILE[:4], "y" * 10000], ids=lambda v: repr(v[:12]))
def test_hostile_env_rejected(value: str) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container(env=["SERVICE_NAME=web", f"SERVICE_OWNER={value}"]))
    assert info.value.culprit == f"{WHO} env SERVICE_OWNER"


@pytest.mark.parametrize(
    "key",
    [
        "discovery.meta.a\nb",
        "discovery.meta." + "k" * 10_000,
        "discovery.\u2028service",
        "SERVICE_\x00X",
    ],
)
def test_hostile_keys_rejected(key: str) -> None:
    with pytest.raises(LabelError) as info:
        parse_container(container({"discovery.service": "web", key: "v"}))
    assert "\n" not in str(info.value) and "\u2028" not in str(info.value)
    assert len(str(info.value)) < 400


def test_hostile_container_name_is_escaped() -> None:
    attrs = container({"discovery.service": "web", "discovery.port": "x"})
    attrs["Name"] = "/evil\nname" + "z" * 500
    with pytest.raises(LabelError) as info:
        parse_container(attrs)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_bad_advertise_address() -> None:
    for bad in ("myhost", "host\nname", "300.1.1.1"):
        with pytest.raises(ValidationError, match="advertise address"):
            parse_container(container({"discovery.service": "web"}), advertise=bad)


# ---- property: never anything but specs or a LabelError --------------------------------

KEYS = st.sampled_from(
    [
        *FIELDS,
        "discovery.80.weight",
        "discovery.80.check",
        "discovery.80.ignore",
        "discovery.check.interval",
        "discovery.check.status",
        "discovery.check.command",
        "SERVICE_80_TAGS",
        "SERVICE_IGNORE",
        "discovery.meta.service",
        "discovery.check.service",
        "discovery.80.meta.service",
        "SERVICE_SERVICE",
        "SERVICE_80_SERVICE",
    ]
)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "web",
            "80",
            "81",
            "http",
            "exec",
            "tcp",
            "none",
            "docker",
            "true",
            "false",
            "2xx",
            "/h",
            "a,b",
            "2s",
            '["true"]',
            "1",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    labels=st.dictionaries(KEYS, VALUES, max_size=6),
    internal=st.booleans(),
    network=st.sampled_from(["bridge", "host"]),
)
def test_fuzz_specs_or_label_error(labels: dict[str, str], internal: bool, network: str) -> None:
    attrs = container(labels, exposed=("80/tcp", "81/tcp", "53/udp"), network=network)
    try:
        specs = parse_container(attrs, internal=internal)
    except LabelError as exc:
        assert exc.culprit.startswith(WHO)
        return
    for spec in specs:  # everything that survives makes a valid registry record
        Instance(
            service=spec.service,
            id=make_instance_id("node1", CID, spec.container_port),
            node="node1",
            address=spec.address,
            port=spec.port,
            tags=spec.tags,
            weight=spec.weight,
            meta=spec.meta,
            container_id=CID,
        )


# ---- keys ending in "service": only service and <port>.service name one -------------------

@pytest.mark.parametrize(("labels", "env", "want"), [
    ({"discovery.service": "web", "discovery.80.meta.service": "evil"}, [],
     [("web", 80, {"service": "evil"}, {})]),
    ({"discovery.service": "web", "discovery.meta.service": "x",
      "discovery.check.service": "y"}, [], [("web", 80, {"service": "x"}, {"service": "y"})]),
    ({}, ["SERVICE_NAME=web", "SERVICE_SERVICE=x", "SERVICE_80_SERVICE=y"],
     [("web", 80, {"service": "y"}, {})]),
    ({}, ["SERVICE_80_NAME=web"], [("web", 80, {}, {})]),
    ({"discovery.meta.service": "x", "discovery.check.service": "y"}, ["SERVICE_SERVICE=z"], []),
])
def test_only_service_keys_name_a_service(labels: dict[str, str], env: list[str],
                                          want: list[tuple[object, ...]]) -> None:
    specs = parse_container(container(labels, env))
    assert [(s.service, s.container_port, s.meta, s.check.params) for s in specs] == want


def test_meta_key_trailing_newline_rejected_here() -> None:
    # validate.meta alone lets "k\n" through (see test_validate); labels check whole keys
    with pytest.raises(LabelError, match="control character"):
        parse_container(container({"discovery.service": "web", "discovery.meta.k\n": "v"}))
