"""Nerve's layout: a node whose create's answer was lost is found and removed by a later
claim, even when the first look for it failed too (it then stayed beside the instance's
node, its data going stale, until the session ended)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kazoo.exceptions import ConnectionLoss, NoNodeError

from discovery.model import Instance
from discovery.registry.url import RegistryURL
from discovery.registry.zk_nerve import NerveNodes

URL = RegistryURL.parse("zk://127.0.0.1:2181/nerve?format=nerve&path=/nerve/services/{service}")


class Ensemble:
    """A kazoo client over a dict of nodes; ``lose`` names calls whose answer is lost once
    (the write is applied all the same)."""

    def __init__(self, *lose: str) -> None:
        self.nodes: dict[str, bytes] = {}
        self.lose, self.seq = list(lose), 0

    def _answer(self, call: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            value = fn()
            if call in self.lose:
                self.lose.remove(call)
                raise ConnectionLoss()
            return value
        return run

    def create_async(self, path: str, data: bytes, **kw: Any) -> Callable[[], Any]:
        def create() -> str:
            self.seq += 1
            name = f"{path}{self.seq:010d}"
            self.nodes[name] = data
            return name
        return self._answer("create", create)

    def set_async(self, path: str, data: bytes) -> Callable[[], Any]:
        def put() -> None:
            if path not in self.nodes:
                raise NoNodeError()
            self.nodes[path] = data
        return self._answer("set", put)

    def get_children_async(self, folder: str) -> Callable[[], Any]:
        return self._answer("list", lambda: [p.rpartition("/")[2] for p in self.nodes
                                             if p.rpartition("/")[0] == folder])

    def get_async(self, path: str) -> Callable[[], Any]:
        return self._answer("get", lambda: (self.nodes[path], type("S", (), {
            "ephemeralOwner": 1})()))

    def delete_async(self, path: str) -> Callable[[], Any]:
        return self._answer("delete", lambda: self.nodes.pop(path))


def test_a_lost_create_whose_first_look_failed_is_removed_by_the_next_claim() -> None:
    zk = Ensemble("create", "list")  # the first create's answer lost; then its first look
    nerve = NerveNodes(zk, URL, lambda answer: answer(), lambda node, key: [])
    web = Instance(service="web", id="h1:000000000001:80", node="h1", address="127.0.0.1",
                   port=8001, registered_at=1.0)
    for _ in range(2):  # the lost create; the create whose look for the lost one failed
        with pytest.raises(ConnectionLoss):
            nerve.claim(web, session=1)
    assert len(zk.nodes) == 2  # the instance's node and the lost one
    nerve.claim(web, session=1)  # an update: it looks again
    assert list(zk.nodes) == [nerve.path(web.key)]


def test_a_deregister_lists_the_services_directory_only_for_a_key_the_index_may_miss() -> None:
    """The index names the instance's node: its deregister deletes it without listing the
    service's directory (a listing of the fleet's instances of that service, ~190 KB at
    5,000, at every deregister). A key whose create's answer was lost is still looked for
    there."""
    zk = Ensemble()
    lists: list[str] = []
    listing = zk.get_children_async

    def counted(folder: str) -> Callable[[], Any]:
        lists.append(folder)
        return listing(folder)

    zk.get_children_async = counted  # type: ignore[method-assign]
    index: dict[tuple[str, str], list[str]] = {}
    nerve = NerveNodes(zk, URL, lambda answer: answer(), lambda node, key: index.get(key, []))
    web, api = (Instance(service=s, id=f"h1:00000000000{n}:80", node="h1", address="127.0.0.1",
                         port=8000 + n, registered_at=1.0) for n, s in ((1, "web"), (2, "api")))
    nerve.claim(web, session=1)
    path = nerve.path(web.key)
    assert path is not None
    index[web.key] = [path.rpartition("/")[2]]  # the index entry the claim writes beside it
    nerve.claim(api, session=1)
    index[api.key] = [nerve.path(api.key).rpartition("/")[2]]  # type: ignore[union-attr]
    lists.clear()
    nerve.forget(web.key)  # a restarted agent: only the index knows the node
    nerve.delete(web.key, "h1")
    assert lists == [] and path not in zk.nodes
    nerve.unindexed([api.key])  # read without its index entry: may have another node
    nerve.delete(api.key, "h1")
    assert lists == [URL.service_dir("api")] and not zk.nodes


def test_a_deregister_whose_delete_failed_finds_the_node_when_retried() -> None:
    """The node's delete failed before it reached the server (a lost connection) and the
    index does not name it (its entry written after it, and that write failed): the retry
    still deletes it (it forgot the node's path at the first try: left until the session
    ended; found by a review)."""
    class Dropping(Ensemble):
        failures = 1

        def delete_async(self, path: str) -> Callable[[], Any]:
            if self.failures:
                self.failures -= 1

                def lost() -> None:
                    raise ConnectionLoss()
                return lost
            return super().delete_async(path)

    zk = Dropping()
    nerve = NerveNodes(zk, URL, lambda answer: answer(), lambda node, key: [])
    web = Instance(service="web", id="h1:000000000001:80", node="h1", address="127.0.0.1",
                   port=8001, registered_at=1.0)
    nerve.claim(web, session=1)
    with pytest.raises(ConnectionLoss):
        nerve.delete(web.key, "h1")
    nerve.delete(web.key, "h1")  # the registry's retry
    assert zk.nodes == {}
