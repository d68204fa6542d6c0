"""Zone lookups: DNS ``<service>.<zone>.zone.<domain>`` and HTTP ``?zone=`` (issue 14)."""

from __future__ import annotations

import json

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from discovery.lookup.dns_wire import answer
from discovery.lookup.http import HttpApi
from discovery.lookup.http_query import Request
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot


def inst(n: int, address: str, zone: str = "") -> Instance:
    return Instance(service="web", id=f"n{n}:{n:012x}:80", node=f"n{n}", address=address,
                    port=8080, zone=zone)


CATALOG = Catalog()
CATALOG.load(Snapshot({i.key: i for i in (inst(1, "192.0.2.1", "z1"), inst(2, "192.0.2.2", "z2"),
                                          inst(3, "fd00::3", "z1"), inst(4, "192.0.2.4"))}, 1))


def ask(name: str, qtype: str) -> DNSRecord:
    wire = answer(bytes(DNSRecord.question(name, qtype).pack()), CATALOG, tcp=True)
    assert wire is not None
    return DNSRecord.parse(wire)


@pytest.mark.parametrize(("name", "qtype", "want"), [
    ("web.z1.zone.discovery", "A", {"192.0.2.1"}),
    ("web.z1.zone.discovery", "AAAA", {"fd00::3"}),
    ("WEB.Z2.zone.discovery", "A", {"192.0.2.2"}),
    ("web.service.discovery", "A", {"192.0.2.1", "192.0.2.2", "192.0.2.4"}),
])
def test_dns_zone_names(name: str, qtype: str, want: set[str]) -> None:
    reply = ask(name, qtype)
    assert RCODE[reply.header.rcode] == "NOERROR"
    assert {str(r.rdata) for r in reply.rr if QTYPE[r.rtype] == qtype} == want


def test_dns_zone_srv_and_unknown_zone() -> None:
    srv = ask("web.z1.zone.discovery", "SRV")
    assert len([r for r in srv.rr if QTYPE[r.rtype] == "SRV"]) == 2
    assert RCODE[ask("web.z9.zone.discovery", "A").header.rcode] == "NXDOMAIN"
    parent = ask("z1.zone.discovery", "A")  # a name below it exists: an empty non-terminal
    assert RCODE[parent.header.rcode] == "NOERROR" and not parent.rr
    assert RCODE[ask("z9.zone.discovery", "A").header.rcode] == "NXDOMAIN"
    assert RCODE[ask("zone.discovery", "A").header.rcode] == "NOERROR"


def get(target: str) -> tuple[int, object]:
    api = HttpApi(CATALOG, lambda: {}, None, "127.0.0.1", 0)
    resp = api.handle(Request(target))
    return resp.status, json.loads(resp.body)


def test_http_zone_filter() -> None:
    status, body = get("/v1/services/web?zone=z1")
    assert status == 200 and isinstance(body, list)
    assert [(i["address"], i["zone"]) for i in body] == [("192.0.2.1", "z1"), ("fd00::3", "z1")]
    status, body = get("/v1/services/web")
    assert status == 200 and isinstance(body, list) and len(body) == 4
    status, body = get("/v1/services/web?zone=Not%20A%20Label")
    assert status == 400 and isinstance(body, dict) and body["param"] == "zone"
