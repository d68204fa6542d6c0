"""The registry's Restorer: what a watch saw deleted or changed of the registry's own entries is
handed to the backend's conditional write, once a key, after a random wait within the window."""

from __future__ import annotations

import dataclasses
import heapq
import threading
import time

import pytest

from discovery.errors import RegistryError, RegistryUnavailable
from discovery.model import Instance, State
from discovery.model.nerve import as_read
from discovery.registry import Change, Snapshot, open_registry
from discovery.registry.owned import Restorer, claiming
from tests.harness.util import wait_for

Key = tuple[str, str]


def _inst(service: str, n: int) -> Instance:
    return Instance(service=service, id=f"n1:{n:012x}:80", node="n1", address="127.0.0.1",
                    port=8000 + n)


class Backend:
    """The owned keys, and the conditional writes asked for (with when)."""

    def __init__(self, owned: set[Key], answer: bool = True) -> None:
        self.owned: dict[Key, Instance] = {k: _inst(k[0], int(k[1].split(":")[1], 16))
                                           for k in owned}
        self.answer = answer
        self.asked: list[tuple[Key, float]] = []
        self.doubted: list[Key] = []

    def restore(self, key: Key, doubt: bool) -> str:
        answer = self.answer
        self.asked.append((key, time.monotonic()))
        if doubt:
            self.doubted.append(key)
        if not answer:
            raise RegistryUnavailable("no member answered")
        return "written back" if key in self.owned else ""


def _restorer(backend: Backend, window: float = 0.2, recheck: float = 10.0) -> Restorer:
    return Restorer(backend.owned, backend.restore, window, "test", recheck=recheck)


def test_a_delete_of_an_owned_entry_is_written_back_within_the_window() -> None:
    a, b = _inst("web", 1), _inst("web", 2)
    backend = Backend({a.key})
    r = _restorer(backend)
    seen: list[str] = []
    cb = r.wrap(lambda c: seen.append(c.kind))
    try:
        start = time.monotonic()
        cb(Change("delete", key=b.key))  # not ours: nothing
        cb(Change("delete", key=a.key))
        cb(Change("delete", key=a.key))  # seen twice (two watches): one write
        assert seen == ["delete"] * 3  # the watch's own callback gets every change
        wait_for(lambda: r.restored == 1, 2.0, message="written back")
        assert [k for k, _ in backend.asked] == [a.key]
        assert backend.asked[0][1] - start <= 0.2 + 0.1
    finally:
        r.close()


def test_a_reset_lacking_an_owned_entry_in_its_scope_is_looked_at() -> None:
    web, api, locked, last = (_inst("web", 1), _inst("api", 2), _inst("locked", 3),
                              _inst("web", 4))
    backend = Backend({web.key, api.key, locked.key, last.key})
    r = _restorer(backend, window=0.0)
    try:
        only_web = r.wrap(lambda c: None, services=["web", "locked"])
        snap = Snapshot(instances={last.key: last}, revision=5,
                        withheld=frozenset({"locked"}))
        only_web(Change("reset", snapshot=snap))  # api: not followed; locked: kept
        wait_for(lambda: backend.asked, 2.0, message="asked")
        everything = r.wrap(lambda c: None)
        full = {i.key: i for i in (web, api, locked, last)}
        everything(Change("reset", snapshot=Snapshot(instances=full)))  # nothing missing
        r.lost([last.key])  # a marker: the queue is in order (window 0), so it comes last
        wait_for(lambda: len(backend.asked) == 2, 2.0, message="the marker")
        assert [k for k, _ in backend.asked] == [web.key, last.key]
    finally:
        r.close()


def test_a_value_another_writer_changed_is_written_back_and_ours_is_not() -> None:
    """A put of an owned key whose value is not what the registry wrote (drained, weight 0, by
    hand) is handed over as changed; one equal apart from write stamps (the agent's own
    write, seen by its watch) is not, nor one of a key not owned; a reset holding an owned
    entry changed is looked at as well."""
    a, b, c = _inst("web", 1), _inst("web", 2), _inst("api", 3)
    backend = Backend({a.key, c.key})
    r = _restorer(backend, window=0.0)
    try:
        cb = r.wrap(lambda _: None)
        cb(Change("put", key=a.key, instance=dataclasses.replace(a, registered_at=9.0,
                                                                 seen_at=9.0)))
        cb(Change("put", key=b.key, instance=dataclasses.replace(b, weight=0)))  # not ours
        cb(Change("put", key=a.key, instance=dataclasses.replace(a, state=State.DRAINING)))
        wait_for(lambda: r.restored == 1, 2.0, message="written back")
        assert [k for k, _ in backend.asked] == [a.key]
        cb(Change("reset", snapshot=Snapshot(instances={
            a.key: a, c.key: dataclasses.replace(c, weight=0)})))
        wait_for(lambda: r.restored == 2, 2.0, message="the reset's")
        assert [k for k, _ in backend.asked] == [a.key, c.key]
        cb(Change("put", key=a.key, instance=a, unowned=True))  # the same, but by hand with
        wait_for(lambda: r.restored == 3, 2.0, message="put on ours")  # no lease or session
        assert [k for k, _ in backend.asked] == [a.key, c.key, a.key]
        # so in a node's read (an own-key watch's re-read behind a compaction)
        cb(Change("reset", snapshot=Snapshot(instances={a.key: a, c.key: c},
                                             unowned=frozenset({c.key}))))
        wait_for(lambda: r.restored == 4, 2.0, message="the node read's")
        assert [k for k, _ in backend.asked] == [a.key, c.key, a.key, c.key]
    finally:
        r.close()


def test_a_key_waiting_keeps_its_turn_and_takes_what_was_seen_last() -> None:
    a = _inst("web", 1)
    backend = Backend({a.key})
    r = _restorer(backend, window=0.3)
    try:
        cb = r.wrap(lambda _: None)
        with r._cond:  # (re-entrant) the turn is not taken before it is looked at
            cb(Change("delete", key=a.key))
            turn = r._due[a.key][0]
            cb(Change("put", key=a.key, instance=dataclasses.replace(a, weight=0)))  # back
            assert r._due[a.key] == (turn, False, False)  # its turn; a change, not a delete
        wait_for(lambda: r.restored == 1, 2.0, message="written back")
        assert len(backend.asked) == 1
    finally:
        r.close()


def test_a_key_whose_write_lost_its_answer_is_left_to_the_agent() -> None:
    """A write whose answer was lost may have landed: its key is unsettled, and what a watch
    then shows of it (maybe that write) is not written back over it, nor is it written back at
    all, until a write of it succeeds; a write that surely failed is only undone."""
    old, new = _inst("web", 1), dataclasses.replace(_inst("web", 1), state=State.DRAINING)
    backend = Backend({old.key})
    r = _restorer(backend, window=0.0)
    owned, lock = backend.owned, threading.Lock()
    try:
        with pytest.raises(RegistryError), claiming(owned, lock, new, r.unsettled):
            raise RegistryError("refused")
        assert owned[old.key] is not new and not r.unsettled
        with pytest.raises(RegistryUnavailable), claiming(owned, lock, new, r.unsettled):
            raise RegistryUnavailable("the answer was lost")
        assert owned[old.key] is not new and r.unsettled == {old.key}
        cb = r.wrap(lambda _: None)
        cb(Change("put", key=old.key, instance=new))  # it landed: not another writer's
        cb(Change("reset", snapshot=Snapshot(instances={old.key: new})))
        assert not r._due
        with claiming(owned, lock, new, r.unsettled):  # the agent's write again
            pass
        assert not r.unsettled
        cb(Change("put", key=old.key, instance=old))  # now another writer's: written back
        wait_for(lambda: r.restored == 1, 2.0, message="written back once settled")
        assert len(backend.asked) == 1
    finally:
        r.close()


@pytest.mark.parametrize("changed, same", [
    ({}, True),
    ({"registered_at": 5.0, "seen_at": 6.0}, True),
    ({"registered_at": 1.0, "written_at": 2.0}, True),
    ({"weight": 0}, False),
    ({"state": State.DRAINING}, False),
    ({"port": 1}, False),
])
def test_a_value_is_compared_as_the_layout_carries_it(changed: dict[str, object],
                                                      same: bool) -> None:
    """Nerve's record carries less than an instance: what the registry wrote is compared with
    what a reader gets back from it, or the host would take its own value for another
    writer's and write it again and again."""
    owned = dataclasses.replace(_inst("web", 1), meta={"node": "elsewhere"}, tags=("a", "b"))
    r = Restorer({owned.key: owned}, Backend(set()).restore, 0.1, "test", wire=as_read)
    read_back = as_read(owned)
    assert read_back is not None and not owned.same_registration(read_back)  # meta differs
    seen = dataclasses.replace(read_back, **changed)  # type: ignore[arg-type]
    assert r.same(owned, seen) is same
    assert Restorer({}, Backend(set()).restore, 0.1, "t").same(owned, owned)
    r.close()


def test_the_waits_are_spread_over_the_window() -> None:
    keys = [_inst("web", n) for n in range(40)]
    backend = Backend({i.key for i in keys})
    r = _restorer(backend, window=0.4)
    try:
        start = time.monotonic()
        r.lost([i.key for i in keys])
        wait_for(lambda: r.restored == 40, 3.0, message="all written back")
        after = sorted(t - start for _, t in backend.asked)
        assert after[-1] <= 0.4 + 0.2
        assert after[-1] - after[0] > 0.2  # spread, not one moment
    finally:
        r.close()


def test_a_lost_answer_is_looked_at_again_in_doubt_and_the_others_wait() -> None:
    """A write-back whose answer was lost may land late, after the entry's own deregister:
    its key comes back once, ``recheck`` s later, in doubt (the backend deletes it then if it
    is no longer owned). The keys waiting behind it wait half ``recheck`` (±25 %) and are
    written back then: they used to be left to the agent's reconcile (up to 33 s later)."""
    a, b = _inst("web", 1), _inst("web", 2)
    owned = {a.key: a, b.key: b}
    asked: list[tuple[Key, bool, float]] = []
    fails = {a.key}
    r: Restorer

    def restore(key: Key, doubt: bool) -> str:
        asked.append((key, doubt, time.monotonic()))
        if key in fails:
            fails.discard(key)
            with r._cond:  # b waiting when a's answer is lost (due before the others' wait)
                r._due[b.key] = (due := time.monotonic() + 0.01, False, True)
                heapq.heappush(r._heap, (due, b.key))
            raise RegistryUnavailable("no member answered")
        return "deleted"

    r = Restorer(owned, restore, 0.0, "test", recheck=0.4)
    try:
        r.lost([a.key])
        wait_for(lambda: r.restored == 2, 3.0, message="b, then a in doubt, written back")
        assert [(k, d) for k, d, _ in asked] == [(a.key, False), (b.key, False), (a.key, True)]
        lost_at, b_at, doubted_at = (t for _, _, t in asked)
        assert 0.15 <= b_at - lost_at <= 0.25 + 1.0
        assert 0.4 <= doubted_at - lost_at <= 0.4 + 1.0
        assert not r._due
    finally:
        r.close()


def test_the_keys_waiting_are_left_to_the_reconcile_once_the_registry_failed_long() -> None:
    """Each failure doubles the others' wait, from half ``recheck`` to four ``recheck``, when
    they are left to the agent's reconcile; a key in doubt keeps its turn, and a success
    starts the wait again."""
    a, b, c = _inst("web", 1), _inst("web", 2), _inst("web", 3)
    backend = Backend({a.key, b.key, c.key})
    r = _restorer(backend, window=0.0, recheck=0.2)
    try:
        now = time.monotonic()
        with r._cond:
            r._due[b.key] = (now, False, True)
            r._due[c.key] = (now + 5.0, True, True)  # in doubt: its own turn
        said = r._postpone()
        assert said.startswith("1 more in ") and r._unavailable.wait == pytest.approx(0.1)
        assert now + 0.075 <= r._due[b.key][0] <= time.monotonic() + 0.125
        for wait in (0.2, 0.4):
            assert r._postpone().startswith("1 more in ")
            assert r._unavailable.wait == pytest.approx(wait)
        assert r._postpone() == "1 more left to the agent's reconcile"
        assert b.key not in r._due and r._due[c.key] == (now + 5.0, True, True)
        r._unavailable.succeeded()
        assert r._postpone() == "0 more in 0.1 s or later"
    finally:
        r.close()


def test_keys_due_together_are_written_back_together() -> None:
    """With ``many`` (ZooKeeper), the keys that fell due while a write-back waited for the
    registry go in one call, not one after another; a call the registry did not answer: its
    keys wait as the others (half ``recheck``), then go together again, none in doubt (one
    ZooKeeper session's requests apply in order: no answer lands late)."""
    keys = [_inst("web", n).key for n in range(1, 6)]
    owned = {k: _inst(k[0], int(k[1].split(":")[1], 16)) for k in keys}
    calls: list[tuple[list[Key], float]] = []
    first = threading.Event()
    release = threading.Event()
    failures = [False]

    def restore(key: Key, doubt: bool) -> str:
        assert not doubt
        calls.append(([key], time.monotonic()))
        first.set()
        release.wait(5)  # the registry slow: the others fall due meanwhile
        return "deleted"

    def many(batch: list[Key]) -> dict[Key, str]:
        calls.append((list(batch), time.monotonic()))
        if failures:
            failures.pop()
            raise RegistryUnavailable("no member answered")
        return dict.fromkeys(batch, "deleted")

    r = Restorer(owned, restore, 0.0, "test", recheck=0.4, many=many)
    try:
        r.lost(keys[:1])
        assert first.wait(2)
        r.lost(keys[1:4])
        release.set()
        wait_for(lambda: len(calls) == 3 and r.restored == 4, 3.0,
                 message="the other three together, twice: the first call unanswered")
        assert [c for c, _ in calls] == [keys[:1], keys[1:4], keys[1:4]]
        assert 0.15 <= calls[2][1] - calls[1][1] <= 0.25 + 1.0  # waited as the others
    finally:
        r.close()


def test_nothing_is_started_before_a_loss_and_close_ends_it() -> None:
    one, two = _inst("web", 1), _inst("web", 2)
    backend = Backend(set())
    r = _restorer(backend, window=60.0)
    r.lost([one.key])  # not ours
    assert r._thread is None
    backend.owned.update({one.key: one, two.key: two})
    r.lost([one.key])
    thread = r._thread
    assert thread is not None and one.key in r._due
    r.close()
    assert not thread.is_alive()
    r.lost([two.key])  # after close: ignored
    assert two.key not in r._due and backend.asked == []


def test_a_watch_callback_never_waits_for_the_registrys_lock() -> None:
    """etcd delivers on its loop thread; the write-back holds the registry's lock while its
    put waits for that loop: a callback that took the lock would stall every stream."""
    reg = open_registry("etcd://127.0.0.1:1/x?spread=60", timeout=0.5)  # no I/O here
    one = _inst("web", 1)
    reg._owned[one.key] = one  # type: ignore[attr-defined]
    seen: list[str] = []
    callback = reg._restorer.wrap(lambda c: seen.append(c.kind))  # type: ignore[attr-defined]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reg._lock:  # type: ignore[attr-defined]
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        start = time.monotonic()
        callback(Change("delete", key=one.key))
        callback(Change("reset", snapshot=Snapshot()))
        assert time.monotonic() - start < 0.5 and seen == ["delete", "reset"]
        assert one.key in reg._restorer._due  # type: ignore[attr-defined]
    finally:
        release.set()
        holder.join()
        reg.close(revoke=False)


def test_an_unsettled_key_is_never_written_back_nor_dropped() -> None:
    """Not by the Restorer's turn (a recheck in doubt too), nor by the backend, which looks
    again under its lock: a register whose write lost its answer marks the key there, and a
    write-back waiting for that lock must not then write the value before over it."""
    a, marker = _inst("web", 1), _inst("web", 2)
    backend = Backend({a.key, marker.key})
    r = _restorer(backend, window=0.0)
    try:
        r.unsettled.add(a.key)
        with r._cond:  # a recheck's turn, in doubt, due at once
            r._due[a.key] = (0.0, True, True)
            heapq.heappush(r._heap, (0.0, a.key))
        r.lost([marker.key])  # starts the thread; comes after it (window 0: in order)
        wait_for(lambda: r.restored == 1, 2.0, message="the marker")
        assert [k for k, _ in backend.asked] == [marker.key]
    finally:
        r.close()
    reg = open_registry("etcd://127.0.0.1:1/x?spread=60", timeout=0.5)  # no I/O if it holds
    try:
        reg._lease = 7  # type: ignore[attr-defined]  # as if leased
        reg._owned[a.key] = a  # type: ignore[attr-defined]
        reg._restorer.unsettled.add(a.key)  # type: ignore[attr-defined]
        assert reg._restore(a.key, False) == ""  # type: ignore[attr-defined]
        del reg._owned[a.key]  # type: ignore[attr-defined]  # a new one's lost register:
        assert reg._restore(a.key, True) == ""  # type: ignore[attr-defined]  # not dropped
    finally:
        reg._lease = None  # type: ignore[attr-defined]
        reg.close(revoke=False)
