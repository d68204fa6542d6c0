"""``<node>.node``: a node's address is its own records' (ids ``<node>:…``, as its agent writes
them), never moved by records that only claim the node in their ``node`` field."""

from __future__ import annotations

import json
import logging

import pytest

from discovery.lookup import dns_zone
from discovery.model import Instance
from discovery.model.nerve import from_nerve
from tests.unit.test_dns import ask, inst, make_catalog, rdatas

OWN = inst("web", 1, "127.0.0.9", node="h1")  # id h1:…: h1's agent wrote it
#: a record naming h1 in its node field under another id (a script's, a hand edit, another host's)
CLAIM = Instance(service="db", id="other:00000000000b:5432", node="h1", address="127.0.0.2",
                 port=5432)


def claims(n: int, address: str = "127.0.0.2") -> list[Instance]:
    return [Instance(service="db", id=f"other:{i:012x}:5432", node="h1", address=address,
                     port=5432) for i in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_records_claiming_a_node_do_not_move_its_answer(n: int) -> None:
    """Before, one such record (a tie: the lower address) or more moved h1.node to 127.0.0.2."""
    catalog = make_catalog([OWN, *claims(n)])
    assert rdatas(ask("h1.node.discovery", "A", catalog=catalog).rr) == ["127.0.0.9"]
    srv = ask("web.service.discovery", "SRV", catalog=catalog)  # h1's own: still at h1.node
    assert [str(rr.rdata.target) for rr in srv.rr] == ["h1.node.discovery."]
    assert {str(rr.rname): str(rr.rdata) for rr in srv.ar} == {"h1.node.discovery.": "127.0.0.9"}
    other = ask("db.service.discovery", "SRV", catalog=catalog)  # the claim: off h1's address
    assert {str(rr.rdata.target) for rr in other.rr} == {"7f000002.addr.discovery."}
    assert rdatas(ask("7f000002.addr.discovery", "A", catalog=catalog).rr) == ["127.0.0.2"]
    assert rdatas(ask("7f000009.addr.discovery", "A", catalog=catalog).rr) == ["127.0.0.9"]


def test_own_records_still_decide_by_majority_then_the_lowest() -> None:
    two = [OWN, inst("web", 2, "127.0.0.2", node="h1")]
    assert rdatas(ask("h1.node.discovery", catalog=make_catalog(two)).rr) == ["127.0.0.2"]
    three = [*two, inst("web", 3, "127.0.0.9", 8081, node="h1"), *claims(4)]
    assert rdatas(ask("h1.node.discovery", catalog=make_catalog(three)).rr) == ["127.0.0.9"]


def test_a_node_with_no_records_of_its_own_answers_what_claims_it() -> None:
    """Nerve's ids need not name the node (``web1.example.com:8080`` of node ``web1``): with
    none of its own, a node's address is still the one most records naming it carry."""
    nerve = [from_nerve(json.dumps({"host": f"127.0.3.{last}", "port": port,
                                    "name": "web1.example.com"}).encode(),
                        "web", f"web1.example.com_{port:010d}", where="t")
             for last, port in ((5, 80), (5, 81), (4, 82))]
    assert {(i.node, i.id.partition(":")[0]) for i in nerve} == {("web1", "web1.example.com")}
    catalog = make_catalog(nerve)
    assert rdatas(ask("web1.node.discovery", catalog=catalog).rr) == ["127.0.3.5"]
    assert rdatas(ask("h1.node.discovery", catalog=make_catalog(claims(1))).rr) == ["127.0.0.2"]


def test_one_warning_names_the_record_outranked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="discovery.lookup.dns_zone")
    warned: set[tuple[str, ...]] = set()  # the server's, across its zones
    for index in range(3):  # the zone is rebuilt on every catalog change: warned once
        dns_zone.Zone([OWN, *claims(2)], index, warned=warned)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "db/other:000000000000:5432" in warnings[0]
    assert "h1" in warnings[0] and "127.0.0.2" in warnings[0] and "127.0.0.9" in warnings[0]


def test_no_warning_when_a_claim_would_not_have_moved_the_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="discovery.lookup.dns_zone")
    dns_zone.Zone([OWN, *claims(1, "127.0.0.9")])  # at the node's own address
    dns_zone.Zone([OWN, inst("web", 2, "127.0.0.9", 8081, node="h1"), CLAIM])  # 2 own : 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_many_outranked_records_are_named_once_a_few_by_name(
        caplog: pytest.LogCaptureFixture) -> None:
    """1,100 nodes each claimed by a record under another id (a script per host): the first
    build names 10 and counts the rest, later builds name none (before: the set of those warned
    was cleared past 1,024, so every rebuild warned 1,100 times); one outranked anew is named."""
    caplog.set_level(logging.WARNING, logger="discovery.lookup.dns_zone")
    own = [inst("web", n, "127.0.1.9", node=f"h{n}") for n in range(1100)]
    claim = [Instance(service="side", id=f"x-{n}:00000000000b:5432", node=f"h{n}",
                      address="127.0.1.2", port=5432) for n in range(1100)]
    tie = [*own, *claim]
    warned: set[tuple[str, ...]] = set()
    counts = []
    for index, instances in enumerate([tie, tie, tie, [*own, *claim[1:]], tie]):
        caplog.clear()
        dns_zone.Zone(instances, index, warned=warned)
        counts.append(len([r for r in caplog.records if r.levelno == logging.WARNING]))
    assert counts == [11, 0, 0, 0, 1], counts  # 10 named + "1090 more"; h0's claim came back
    assert "h0.node" in caplog.records[-1].getMessage()
