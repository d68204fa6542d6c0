"""Nerve's record both ways, and the ``format=nerve`` / ``path=`` registry URL (pure)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from discovery.errors import ConfigError
from discovery.model import Instance, State
from discovery.model.nerve import from_nerve, node_prefix, to_nerve
from discovery.registry.decoder import Decoder
from discovery.registry.url import RegistryURL
from discovery.registry.zk_index import ZkNodeIndex

OURS = Instance(service="web", id="host1:3f2a9c0d1e2b:8080", node="host1", address="192.0.2.6",
                port=32768, tags=("a", "b"), weight=7, meta={"v": "1"},
                container_id="3f2a9c0d1e2b" * 2, container_name="web-1", image="web:1",
                state=State.DRAINING)


def test_our_record_round_trips_through_nerves_json() -> None:
    raw = to_nerve(OURS)
    data = json.loads(raw)
    assert set(data) == {"host", "port", "name", "weight", "labels"}
    assert (data["host"], data["port"], data["name"]) == ("192.0.2.6", 32768, OURS.id)
    back = from_nerve(raw, "web", f"{OURS.id}_0000000042", "here")
    assert back.same_registration(OURS)


def test_a_record_as_nerve_writes_it() -> None:
    raw = b'{"host":"203.0.113.3","port":8080,"name":"I-0ABC","weight":900,"labels":{"az":"e1",' \
          b'"n":3,"deep":{"x":1},"bad key":"y"},"haproxy_server_options":"backup"}'
    inst = from_nerve(raw, "web", "I-0ABC_0000000003", "here", stamp=1.7e9)
    # not a valid id as it is (upper case): the node and a digest of the name
    assert (inst.id, inst.node, inst.address, inst.port) == ("i-0abc-8702c911:8080", "i-0abc",
                                                            "203.0.113.3", 8080)
    assert (inst.weight, inst.meta, inst.state) == (256, {"az": "e1", "n": "3"}, State.UP)
    assert inst.registered_at == 1.7e9


def test_the_zone_is_carried_as_a_label() -> None:
    """Written as the ``zone`` label and read back (before, not written: a watcher reading
    this layout routed no zone); a ``zone`` label that is no DNS label reads as no zone."""
    zoned = replace(OURS, zone="eu1")
    assert json.loads(to_nerve(zoned))["labels"]["zone"] == "eu1"
    back = from_nerve(to_nerve(zoned), "web", f"{OURS.id}_0000000042", "here")
    assert back.zone == "eu1" and back.same_registration(zoned)
    assert "zone" not in json.loads(to_nerve(OURS))["labels"]
    for hostile in ("EU1", "a" * 64, "e u", "-x", "x\n", 1.5, None, {"a": 1}, "\u202e", 1, True):
        raw = json.dumps({"host": "192.0.2.1", "port": 80, "labels": {"zone": hostile}})
        inst = from_nerve(raw, "web", "h_0000000001", "here")
        assert inst.zone == "" and "zone" not in inst.meta, hostile
    nerves = from_nerve(b'{"host":"192.0.2.1","port":80,"labels":{"zone":"us-east-1a"}}',
                        "web", "h_0000000001", "here")
    assert nerves.zone == "us-east-1a" and nerves.meta == {}
    # meta under a reserved name is not carried: meta zone made a zone of an instance with none
    metazone = replace(OURS, meta={"zone": "eu1", "image": "x", "team": "a"}, image="")
    labels = json.loads(to_nerve(metazone))["labels"]
    assert "zone" not in labels and "image" not in labels and labels["team"] == "a"
    back = from_nerve(to_nerve(metazone), "web", f"{OURS.id}_0000000042", "here")
    assert back.zone == "" and back.meta == {"team": "a"}


def test_two_node_names_never_make_one_instance() -> None:
    """Each name ZooKeeper tells apart is an instance of its own: names lower-cased, or one
    that is no id taken as its node alone, or two IPv6 hosts whose addresses give one node
    name, made one key, and one replaced the other in every catalog."""
    nodes = [("web1_0000000001", {"host": "192.0.2.1", "port": 80, "name": "web1"}),
             ("WEB1_0000000002", {"host": "192.0.2.2", "port": 80}),
             ("web1+canary_0000000007", {"host": "192.0.2.9", "port": 80, "name": "web1.canary"}),
             ("a b_0000000001", {"host": "2001:db8::1", "port": 80}),
             ("c d_0000000002", {"host": "2001:db8:1::", "port": 80})]
    insts = [from_nerve(json.dumps(d), "web", child, "here") for child, d in nodes]
    assert len({i.key for i in insts}) == len(nodes)
    assert insts[0].id == "web1:80"  # a valid id as it is: kept
    assert [i.node for i in insts[3:]] == ["2001-db8-1", "2001-db8-1"]  # one node, two ids
    # the same name again (a restarted Nerve's new node): the same instance
    again = from_nerve(json.dumps(nodes[1][1]), "web", "WEB1_0000000042", "here")
    assert again.key == insts[1].key


def test_a_name_with_a_colon_serving_two_ports_is_two_instances() -> None:
    """A Nerve name holding a ``:`` (not ours, ``<node>:<container>:<port>``) was taken as the
    id whole: its two ports were one key, and one replaced the other in every catalog."""
    def read(child: str, port: int, **labels: str) -> Instance:
        record = {"host": "192.0.2.1", "port": port, "name": node_prefix(child),
                  "labels": labels}
        return from_nerve(json.dumps(record), "web", child, "here")

    blue = [read("web:blue_0000000001", 8080), read("web:blue_0000000002", 8081)]
    assert blue[0].key != blue[1].key and [i.port for i in blue] == [8080, 8081]
    assert read("web:blue_0000000042", 8081).key == blue[1].key  # a restarted Nerve's: stable
    assert blue[0].id == "web-4348a614:8080" and blue[0].node == "web"
    # nor does a name with a : make the id of another name ZooKeeper tells apart
    pairs = [("a:80_0000000001", "a_0000000002"), ("x:y_0000000001", "x:y:80_0000000002")]
    for one, other in pairs:
        assert read(one, 80).key != read(other, 80).key, (one, other)
    shaped = [read("h:web:1_0000000001", 8080), read("h:web:1_0000000002", 8081)]
    assert shaped[0].key != shaped[1].key  # our shape, but no node label: not ours
    ours = read("h:ab12:80_0000000001", 32768, node="h")  # (the container's port in its id)
    assert ours.id == "h:ab12:80"  # ours: as it is


def test_node_falls_back_to_the_address() -> None:
    inst = from_nerve(b'{"host":"203.0.113.3","port":"81"}', "web", "_0000000001", "here")
    assert (inst.node, inst.port) == ("203-0-113-3", 81)


@pytest.mark.parametrize(("weight", "read"), [('"5"', 5), ("5", 5), ('"0"', 0), ('"900"', 256),
                                              ('"-5"', 100), ('"x"', 100), ("true", 100)])
def test_a_weight_given_as_digits_is_a_number(weight: str, read: int) -> None:
    raw = f'{{"host":"192.0.2.1","port":80,"weight":{weight}}}'.encode()
    assert from_nerve(raw, "web", "h_0000000001", "here").weight == read  # "5" was read as 100


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"port":80}', b'{"host":"192.0.2.1"}',
                                 b'{"host":"web.example.com","port":80}',
                                 b'{"host":"192.0.2.1","port":0}',
                                 b'{"host":"192.0.2.1","port":1.5}',
                                 b'{"host":"192.0.2.1","port":80,"x":' + b"[" * 40 + b"]" * 40
                                 + b"}",
                                 b'{"host":"192.0.2.1","port":80,"p":"' + b"x" * 70_000 + b'"}'])
def test_malformed_nerve_records_are_skipped_with_one_warning(
        raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder(RegistryURL.parse("zk://h/nerve?format=nerve"))
    assert decoder.decode("/nerve/web/i-1_0000000001", raw) is None
    assert decoder.decode("/nerve/web/i-1_0000000001", raw) is None
    assert decoder.skipped == 2
    assert [r.getMessage().count("/nerve/web/i-1_0000000001") for r in caplog.records] == [1]


def test_sequence_suffix() -> None:
    assert node_prefix("a:b:1_0000000012") == "a:b:1"
    assert node_prefix("plain") == "plain" and node_prefix("x_12") == "x_12"


def test_nerve_url_layouts() -> None:
    flat = RegistryURL.parse("zk://h/nerve?format=nerve")
    assert (flat.services_root, flat.service_dir("web")) == ("/nerve", "/nerve/web")
    airbnb = RegistryURL.parse("zk://h/x?format=nerve&path=/nerve/services/{service}/services")
    assert airbnb.service_dir("web") == "/nerve/services/web/services"
    assert airbnb.split_key("/nerve/services/web/services/i-1_0000000001") == (
        "web", "i-1_0000000001")
    assert airbnb.split_key("/nerve/services/web/other/i-1_0000000001") is None
    assert RegistryURL.parse(str(airbnb)) == airbnb


@pytest.mark.parametrize("url", ["etcd://h/p?format=nerve", "zk://h/p?format=xml",
                                 "zk://h/p?path=/a/{service}",
                                 "zk://h/p?format=nerve&path=/a/{service}x",
                                 "zk://h/p?format=nerve&path=a/{service}",
                                 "zk://h/p?format=nerve&path=/a/{service}/{service}"])
def test_bad_nerve_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="registry URL"):
        RegistryURL.parse(url)


@pytest.mark.parametrize(("url", "indexed"), [
    ("zk://h:2181/discovery", True),
    ("zk://h:2181/nerve?format=nerve&path=/nerve/services/{service}/services", True),  # Airbnb's
    ("zk://h:2181/?format=nerve&path=/services/{service}", True),  # index: /discovery/nerve-nodes
    ("zk://h:2181/nerve?format=nerve", False),  # the services are /nerve's children
    ("zk://h:2181/nerve?format=nerve&path=/nerve/{service}/services", False),
    ("zk://h:2181/nerve?format=nerve&path=/nerve/nerve-nodes/{service}", False),
    ("zk://h:2181/a/b?format=nerve&path=/a/{service}", False),  # /a/b/nerve-nodes is under /a
])
def test_the_node_index_lives_only_apart_from_the_services(url: str, indexed: bool) -> None:
    index = ZkNodeIndex(None, RegistryURL.parse(url), None, None, None, None)  # type: ignore
    assert index.enabled is indexed


def test_nerves_index_is_apart_from_ours_under_the_same_prefix() -> None:
    """A Nerve URL with path= keeps the default prefix, where an agent of our layout on the
    same host keeps its index (migration.md runs both): Nerve's never touches it."""
    def base(url: str) -> str:
        return ZkNodeIndex(None, RegistryURL.parse(url), None, None, None, None).base  # type: ignore

    assert base("zk://h:2181/discovery") == "/discovery/nodes"
    assert base("zk://h:2181/?format=nerve&path=/nerve/{service}") == "/discovery/nerve-nodes"
