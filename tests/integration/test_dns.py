"""The DNS endpoint seen by a real resolver client: ``dig`` over UDP and TCP on loopback."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from discovery.lookup.dns import DnsServer
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot
from tests.harness.util import require_tool

pytestmark = pytest.mark.integration


def inst(service: str, n: int, address: str, port: int, node: str, **kw: object) -> Instance:
    return Instance(service=service, id=f"{node}:{n:012x}:{port}", node=node, address=address,
                    port=port, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    instances = [
        inst("web", 1, "192.0.2.1", 8080, "node1", tags=("blue",)),
        inst("web", 2, "192.0.2.2", 8080, "node2"),
        inst("web", 3, "192.0.2.3", 8080, "node3", state=State.DRAINING),
        inst("db", 4, "fd00::4", 5432, "node4"),
        *(inst("big", 100 + i, f"203.0.113.{i + 1}", 9000 + i, f"b{i}") for i in range(60)),
    ]
    cat = Catalog()
    cat.load(Snapshot({i.key: i for i in instances}))
    return cat


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[DnsServer]:
    with DnsServer(catalog, port=0, domain="discovery.", ttl=5) as srv:
        yield srv


def dig(server: DnsServer, *args: str) -> str:
    out = subprocess.run(
        [require_tool("dig", "dnsutils"), "@127.0.0.1", "-p", str(server.port), "+time=2",
         "+tries=1", *args],
        capture_output=True, text=True, timeout=20, check=True,
    )
    return out.stdout


def short(server: DnsServer, *args: str) -> list[str]:
    return sorted(dig(server, "+short", *args).split("\n")[:-1])


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_a_aaaa_srv_node(server: DnsServer, transport: str) -> None:
    assert short(server, transport, "web.service.discovery", "A") == ["192.0.2.1", "192.0.2.2"]
    assert short(server, transport, "Blue.Web.Service.Discovery.", "A") == ["192.0.2.1"]
    assert short(server, transport, "db.service.discovery", "AAAA") == ["fd00::4"]
    assert short(server, transport, "_web._tcp.service.discovery", "SRV") == [
        "1 100 8080 node1.node.discovery.", "1 100 8080 node2.node.discovery."]
    assert short(server, transport, "node2.node.discovery", "A") == ["192.0.2.2"]
    full = dig(server, transport, "web.service.discovery", "SRV")
    assert "ADDITIONAL: 3" in full  # the two targets' addresses + OPT
    assert "node1.node.discovery.\t5\tIN\tA\t192.0.2.1" in full, full


def test_nxdomain_refused_and_flags(server: DnsServer) -> None:
    nx = dig(server, "nope.service.discovery", "A")
    assert "status: NXDOMAIN" in nx and "flags: qr aa rd;" in nx
    assert "AUTHORITY: 1" in nx and "SOA\tns.discovery. hostmaster.discovery." in nx
    outside = dig(server, "example.com", "A")
    assert "status: REFUSED" in outside and "ANSWER: 0" in outside
    assert "recursion requested but not available" in outside


def test_truncation_then_tcp(catalog: Catalog) -> None:
    with DnsServer(catalog, port=0, udp_answer_limit=0) as uncapped:  # size limits only
        truncated = dig(uncapped, "+ignore", "+noedns", "big.service.discovery", "A")
        assert "flags: qr aa tc rd;" in truncated
        # dig retries over TCP by itself when it sees TC: the whole answer
        assert len(short(uncapped, "+noedns", "big.service.discovery", "A")) == 60
        edns = dig(uncapped, "+ignore", "+bufsize=4096", "big.service.discovery", "A")
        assert "ANSWER: 60" in edns and " tc" not in edns.split("flags:")[1].split(";")[0]


def test_udp_answer_limit_and_full_set_over_tcp(server: DnsServer) -> None:
    for qtype in ("A", "SRV", "ANY"):
        udp = dig(server, "+notcp", "+ignore", "+bufsize=4096", "big.service.discovery", qtype)
        assert "ANSWER: 3," in udp and " tc" not in udp.split("flags:")[1].split(";")[0]
    assert len(short(server, "+tcp", "big.service.discovery", "A")) == 60
    assert len(short(server, "+tcp", "big.service.discovery", "SRV")) == 60
    full = dig(server, "+tcp", "big.service.discovery", "SRV")
    assert "ADDITIONAL: 61" in full  # 60 targets' A records + OPT
    seen: set[str] = set()  # over UDP the windows move round: every instance gets its turn
    deadline = time.monotonic() + 30
    while len(seen) < 60 and time.monotonic() < deadline:
        seen.update(short(server, "+notcp", "big.service.discovery", "A"))
    assert len(seen) == 60


def test_amplification_with_dig(server: DnsServer) -> None:
    for qtype in ("A", "SRV", "ANY"):
        out = dig(server, "+notcp", "+qr", "+nocookie", "+bufsize=4096", "big.service.discovery",
                  qtype)
        sent = int(re.search(r"QUERY SIZE: (\d+)", out).group(1))  # type: ignore[union-attr]
        rcvd = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1))  # type: ignore[union-attr]
        assert rcvd <= 10 * sent, (qtype, sent, rcvd)


def test_catalog_changes_are_seen(server: DnsServer, catalog: Catalog) -> None:
    assert short(server, "web.service.discovery") == ["192.0.2.1", "192.0.2.2"]
    before = dict((i.key, i) for i in catalog.instances())
    one = next(i for i in before.values() if i.address == "192.0.2.2")
    try:
        catalog.load(Snapshot({k: (i.with_state(State.DRAINING) if i is one else i)
                               for k, i in before.items()}))
        assert short(server, "web.service.discovery") == ["192.0.2.1"]
    finally:
        catalog.load(Snapshot(before))
    assert short(server, "web.service.discovery") == ["192.0.2.1", "192.0.2.2"]
