"""A view's watch when the routed services change (registry/view.py): the new watch's first
read takes over; the old watch runs on until then (its changes pass), and what it sends after
is dropped (it may lag behind that read). Pure logic: a scripted registry, no server."""

from __future__ import annotations

import threading
from collections.abc import Callable

from discovery.model import Instance
from discovery.registry.base import Change, Snapshot
from discovery.registry.view import ServicesView
from discovery.watcher.core import Watcher
from tests.harness.scripted import ScriptedRegistry
from tests.harness.util import wait_for


def inst(service: str, n: int) -> Instance:
    return Instance(service=service, id=f"h{n}:{n:012x}:80", node=f"h{n}",
                    address="127.0.0.1", port=8000 + n)


def put(callback: Callable[[Change], None], i: Instance) -> None:
    callback(Change("put", key=i.key, instance=i))


def test_the_new_watch_takes_over_at_its_read_and_the_old_runs_on_until_then() -> None:
    inner = ScriptedRegistry(Snapshot({i.key: i for i in (inst("web", 1), inst("api", 2))}))
    view = ServicesView(inner, ["web"])  # type: ignore[arg-type]
    got: list[Change] = []
    lock = threading.Lock()

    def seen(change: Change) -> None:
        with lock:
            got.append(change)

    view.watch(seen, 0)
    [old] = inner.callbacks
    put(old, inst("web", 3))
    inner.fails = 1  # the first read of the new set fails: the old watch goes on meanwhile
    running: list[list[int]] = []  # the watches stopped, at each read of the new set

    def during() -> None:
        running.append(list(inner.stopped))
        put(old, inst("web", 3 + len(running)))  # the old watch, during each read: passed on

    inner.during = during
    view.set_services(["web", "api"])
    wait_for(lambda: len(inner.callbacks) == 2 and inner.stopped == [0], 10,
             message="the new watch made, the old stopped")
    assert running == [[], []]  # two reads (one failed), the old watch running through both
    put(old, inst("web", 6))  # the old watch, late: dropped
    put(inner.callbacks[1], inst("api", 7))
    with lock:
        kinds = [(c.kind, c.key[1][:2]) for c in got]
    assert kinds == [("put", "h3"), ("put", "h4"), ("put", "h5"), ("reset", ""),
                     ("put", "h7")], kinds
    reset = got[3].snapshot
    assert reset is not None and {k[0] for k in reset.instances} == {"web", "api"}
    view.close(revoke=False)
    assert inner.stopped == [0, 1] and inner.closed


def test_a_read_that_keeps_failing_is_tried_until_it_succeeds_or_a_newer_set_comes() -> None:
    """No giving up after a while (an etcd watch from revision 1 replayed its whole history,
    no reset): the old watch runs on, the read is tried again; a newer set takes over."""
    everything = {i.key: i for i in (inst("web", 1), inst("api", 2), inst("db", 3))}
    inner = ScriptedRegistry(Snapshot(everything))
    view = ServicesView(inner, ["web"])  # type: ignore[arg-type]
    got: list[Change] = []
    view.watch(got.append, 0)
    inner.fails = 1000
    asked: list[int] = []
    inner.during = lambda: asked.append(inner.fails)
    view.set_services(["web", "api"])
    wait_for(lambda: len(asked) >= 2, 10, message="the read tried again")
    view.set_services(["web", "db"])
    inner.fails = 0
    wait_for(lambda: [c.kind for c in got] == ["reset"], 15, message="the newest set's read")
    reset = got[0].snapshot
    assert reset is not None and {k[0] for k in reset.instances} == {"web", "db"}
    assert len(inner.callbacks) == 2 and inner.stopped == [0]  # one new watch: the newest
    view.close(revoke=False)


def test_services_a_sighup_stops_routing_are_left_not_taken_for_a_wipe() -> None:
    """A fleet's config push that drops routed services: the new read covers only those still
    routed. What the catalog held of the others was counted as removed from the registry: a
    wipe on every host at once (3 of 4 services emptied), its services held 45 s, and a host
    that died just before was put back and routed again."""
    def on(service: str, n: int, node: str) -> Instance:
        return Instance(service=service, id=f"{node}:{n:012x}:80", node=node,
                        address="192.0.2.1", port=8000 + n)

    web = [on("web", n, f"n{n}") for n in range(1, 5)]
    others = [on(s, 10 + k, f"n{k + 1}") for s in ("a", "b", "c") for k in range(2)]
    inner = ScriptedRegistry(Snapshot({i.key: i for i in web + others}, 5))
    view = ServicesView(inner, ["web", "a", "b", "c"])  # type: ignore[arg-type]
    watcher = Watcher(view, None)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        assert watcher.wait_ready(5) and watcher.catalog.size() == 10
        dead = web[3]  # its host died: a bare delete, web has others: applied at once
        del inner.snap.instances[dead.key]
        inner.callbacks[0](Change("delete", key=dead.key, revision=6))
        wait_for(lambda: watcher.catalog.get(dead.key) is None, 5, message="n4 applied")
        view.set_services(["web"])
        wait_for(lambda: len(inner.callbacks) == 2 and watcher.catalog.size() == 3, 5,
                 message="the new read applied: web's three left")
        assert watcher.guard.status.engaged == 0 and watcher.guard.held() == []
        assert sorted(i.node for i in watcher.catalog.instances()) == ["n1", "n2", "n3"]
        assert watcher.catalog.services().keys() == {"web"}
    finally:
        watcher.stop()
        thread.join(5)
        watcher.close()
    assert not thread.is_alive()
