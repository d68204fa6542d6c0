"""``/v1/services`` for the whole catalog, kept by service (``lookup/http_whole.py``): byte for
byte the answer built from every instance, and a change serialises its service only."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from discovery.lookup.http_guard import dump_json
from discovery.lookup.http_whole import WholeCatalog
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot


def record(rng: random.Random, n: int) -> Instance:
    return Instance(service=rng.choice(("web", "db", "api", "x-1")),
                    id=f"h{n % 7}:{n:012x}:80", node=f"h{n % 7}", address=f"127.0.0.{n % 9 + 1}",
                    port=80 + n % 3, tags=tuple(sorted(rng.sample(("a", "b", "c"), 2))),
                    meta={"k": f"v{n}", "quote": "a\"b ü"}, zone=rng.choice(("", "z1")),
                    state=rng.choice((State.UP, State.DRAINING)))


def whole(catalog: Catalog) -> bytes:
    """The answer as it was built before: every instance, grouped, dumped."""
    data: dict[str, dict[str, list[object]]] = {"services": {}}
    for inst in catalog.instances():
        data["services"].setdefault(inst.service, []).append(inst.to_dict())
    return dump_json(data, False)


def loaded(rng: random.Random) -> Catalog:
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in (record(rng, n) for n in range(40))}, revision=1))
    return catalog


def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The service of each instance turned into JSON from now on."""
    dumped: list[str] = []
    real = Instance.to_dict
    monkeypatch.setattr(Instance, "to_dict", lambda self: dumped.append(self.service) or
                        real(self))
    return dumped


@pytest.mark.parametrize("seed", range(4))
def test_the_answer_kept_by_service_is_the_answer_built_whole(seed: int) -> None:
    rng = random.Random(seed)
    catalog, answers = Catalog(), 0
    kept = WholeCatalog(catalog)
    assert json.loads(kept.body()) == {"services": {}}
    for step in range(120):
        held = catalog.instances()
        if step % 40 == 0:  # a reset
            catalog.load(Snapshot({i.key: i for i in (record(rng, rng.randrange(60))
                                                      for _ in range(12))}, revision=1))
        elif held and rng.random() < 0.4:
            catalog.apply(Change("delete", rng.choice(held).key, revision=2))
        else:
            new = record(rng, rng.randrange(60))
            catalog.apply(Change("put", new.key, new, revision=2))
        if rng.random() < 0.7:  # (sometimes two changes between answers)
            assert kept.body() == whole(catalog)
            answers += 1
    assert answers > 50


def test_a_change_serialises_its_service_only(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    catalog = loaded(rng)
    kept = WholeCatalog(catalog)
    kept.body()
    dumped = counted(monkeypatch)
    one = catalog.instances("db")[0]
    catalog.apply(Change("put", one.key, replace(one, weight=7), revision=2))
    assert kept.body() == whole(catalog)
    assert set(dumped[:len(catalog.instances("db"))]) == {"db"}
    assert len(dumped) - len(catalog.instances()) == len(catalog.instances("db"))  # (+ whole)
    dumped.clear()
    kept.body()  # nothing changed since: nothing serialised
    assert dumped == []


def test_the_api_answers_the_whole_catalog_from_its_parts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /v1/services``: the kept answer, its index header as before; with a filter or
    ``pretty``, built whole."""
    from discovery.lookup.http import HttpApi

    rng = random.Random(3)
    catalog = loaded(rng)
    api = HttpApi(catalog, dict, None)
    first = api.handle("/v1/services")
    assert first.status == 200 and first.body == whole(catalog)
    assert first.headers["X-Discovery-Index"] == str(catalog.index)
    dumped = counted(monkeypatch)
    one = catalog.instances("web")[0]
    catalog.apply(Change("put", one.key, replace(one, weight=9), revision=2))
    again = api.handle("/v1/services")
    assert set(dumped) == {"web"} and len(dumped) == len(catalog.instances("web"))
    assert json.loads(again.body) == json.loads(whole(catalog))
    up = json.loads(api.handle("/v1/services?up=true").body)["services"]
    assert sum(map(len, up.values())) == len(catalog.instances(include_draining=False))
    assert api.handle("/v1/services?pretty=true").body == dump_json(json.loads(again.body), True)
