"""A node's index nodes deleted by another writer are put back at its agent's next reconcile
(``ZkNodeIndex._put_back``), each in its own transaction (one failing fails no other), all
sent before the first answer is waited for: one round trip a reconcile, however many were
deleted. Before, one round trip each (a fleet's index deleted: ~10 a host, one after another)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    NoAuthError,
    NoNodeError,
    RolledBackError,
    RuntimeInconsistency,
)

from discovery.model import Instance
from discovery.registry.decoder import Decoder
from discovery.registry.reads import ReadStats
from discovery.registry.url import RegistryURL
from discovery.registry.zk_index import ZkNodeIndex

URL = RegistryURL.parse("zk://127.0.0.1:2181/t")
ME, SESSION = "node-me", 7


def inst(n: int) -> Instance:
    return Instance(service="web", id=f"{ME}:{n:012x}:80", node=ME, address="127.0.0.1",
                    port=8000 + n, registered_at=1.0)


class Ensemble:
    """What the index sends and waits for, in order; ``answers[index]``: the results of the
    transaction creating ``index`` (its check's, its create's), each time it is sent."""

    def __init__(self, answers: dict[str, list[list[Any]]],
                 make: Exception | None = None) -> None:
        self.client_id, self.events = (SESSION, b""), list[tuple[str, str]]()
        self.answers, self.make = answers, make  # make: what ensure_path raises
        self.checks: list[tuple[str, int]] = []

    def transaction(self) -> Any:
        ops: list[str] = []
        txn = SimpleNamespace(check=lambda path, version: self.checks.append((path, version)),
                              create=lambda path, data, ephemeral: ops.append(path))

        def commit_async() -> Any:
            index = ops[0]
            self.events.append(("sent", index))
            results = self.answers[index].pop(0) if self.answers.get(index) else [True, index]
            return SimpleNamespace(get=lambda: self.events.append(("waited", index)) or (
                results if isinstance(results, list) else _raise(results)))
        txn.commit_async = commit_async
        return txn

    def ensure_path_async(self, path: str) -> Any:
        self.events.append(("made", path))
        return SimpleNamespace(get=lambda: _raise(self.make) if self.make else path)


def _raise(exc: Exception) -> Any:
    raise exc


def put_back(ensemble: Ensemble, n: int) -> dict[tuple[str, str], Instance]:
    stat = SimpleNamespace(mtime=0, version=3, ephemeralOwner=SESSION)
    many = SimpleNamespace(data=lambda paths: {p: (inst(i).to_json(), stat)
                                               for i, p in enumerate(paths)})
    index = ZkNodeIndex(ensemble, URL, lambda answer: answer.get(), Decoder(URL), ReadStats(),
                        many, as_written=lambda key, seen: True)  # type: ignore[arg-type]
    return index._put_back(ME, [inst(i).key for i in range(n)])


def index_of(n: int) -> str:
    return f"/t/nodes/{ME}/web/{inst(n).id}"


def test_every_put_back_is_sent_before_the_first_answer_is_waited_for() -> None:
    ensemble = Ensemble({})
    found = put_back(ensemble, 3)
    assert set(found) == {inst(i).key for i in range(3)}
    assert ensemble.events == ([("sent", index_of(i)) for i in range(3)]
                               + [("waited", index_of(i)) for i in range(3)])
    assert ensemble.checks == [(URL.key(*inst(i).key), 3) for i in range(3)]  # as read


def test_one_refused_fails_no_other_and_a_missing_parent_is_made_once_for_all() -> None:
    """The first's check failed (its instance changed since it was read): left to the
    reconcile. The other two found their service's directory gone: it is made once, and
    both are sent again together."""
    no_parent = [[RolledBackError(), NoNodeError()]]
    ensemble = Ensemble({index_of(0): [[BadVersionError(), RuntimeInconsistency()]],
                         index_of(1): list(no_parent), index_of(2): list(no_parent)})
    found = put_back(ensemble, 3)
    assert set(found) == {inst(1).key, inst(2).key}
    made = ensemble.events.index(("made", f"/t/nodes/{ME}/web"))
    assert ensemble.events.count(("made", f"/t/nodes/{ME}/web")) == 1
    assert ensemble.events[made + 1:] == [("sent", index_of(1)), ("sent", index_of(2)),
                                          ("waited", index_of(1)), ("waited", index_of(2))]


def test_a_parent_refused_leaves_those_under_it_to_the_reconcile() -> None:
    no_parent = [[RolledBackError(), NoNodeError()]]
    ensemble = Ensemble({index_of(1): list(no_parent)}, make=NoAuthError())
    assert set(put_back(ensemble, 3)) == {inst(0).key, inst(2).key}
    assert ensemble.events.count(("sent", index_of(1))) == 1


def test_a_lost_connection_raises_once_all_were_sent() -> None:
    """Nothing is taken as put back: the next reconcile reads the index again (each
    transaction is whole or nothing, so none is left half made)."""
    ensemble = Ensemble({index_of(0): [ConnectionLoss()]})  # type: ignore[list-item]
    with pytest.raises(ConnectionLoss):
        put_back(ensemble, 3)
    assert [e for e in ensemble.events if e[0] == "sent"] == [("sent", index_of(i))
                                                              for i in range(3)]
