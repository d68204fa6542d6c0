"""Which owned keys a registry watches alone (those no running watch follows), and etcd's one
stream of them: replaced once the set settles, the old one stopped once the new one holds
(kept, and the replacement tried again later, when it does not)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from discovery.model import Instance
from discovery.registry.etcd_own import OwnKeys
from discovery.registry.owned import Restorer
from tests.harness.servers import wait_until


def inst(service: str, n: int) -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=80)


@dataclass
class FakeWatch:
    keys: frozenset[tuple[str, str]]
    revision: int = 0  # etcd answered its creates: > 0
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


@dataclass
class Starts:
    made: list[FakeWatch] = field(default_factory=list)
    held: bool = True  # each new watch holds its watchers at once

    def __call__(self, keys: frozenset[tuple[str, str]]) -> FakeWatch:
        w = FakeWatch(keys, revision=7 if self.held else 0)
        self.made.append(w)
        return w


class OnlyRecorder:
    def __init__(self) -> None:
        self.calls: list[set[tuple[str, str]]] = []

    @property
    def keys(self) -> set[tuple[str, str]]:
        return self.calls[-1] if self.calls else set()

    def only(self, keys: object) -> None:
        self.calls.append(set(keys))  # type: ignore[call-overload]

    def close(self) -> None:
        pass


def test_the_restorer_hands_its_own_watches_the_keys_no_running_watch_follows() -> None:
    web, api = inst("web", 1), inst("api", 2)
    owned = {web.key: web, api.key: api}
    restorer = Restorer(owned, lambda key, doubt: "", 0.1, "test")
    own = OnlyRecorder()
    restorer.own = own
    restorer.watch_own()
    assert own.keys == {web.key, api.key}  # no watch: both
    web_watch = threading.Event()
    restorer.followed(["web"], web_watch)
    assert own.keys == {api.key}
    everything = threading.Event()
    restorer.followed(None, everything)
    assert own.keys == set()
    everything.set()  # stopped: its keys are the own watches' again at the next look
    restorer.watch_own()
    assert own.keys == {api.key}
    web_watch.set()
    restorer.watch_own()
    assert own.keys == {web.key, api.key}
    restorer.close()


def test_etcd_replaces_its_stream_once_the_set_settles_the_old_one_kept_until_it_holds(
        ) -> None:
    starts = Starts()
    own = OwnKeys(starts, settle=0.3, most=5.0, hold_wait=5.0)
    keys = [("web", "a")]
    own.only(keys)  # the first stream: once settled too
    wait_until(lambda: len(starts.made) == 1, 2, "the first stream")
    assert starts.made[0].keys == {("web", "a")}
    for n in range(6):  # registrations 0.1 s apart: settled from the last, one replacement
        keys.append(("web", f"b{n}"))
        own.only(keys)
        time.sleep(0.1)  # (the pace of the registrations, not a wait)
        assert len(starts.made) == 1
    wait_until(lambda: len(starts.made) == 2, 2, "the replacement")
    assert len(starts.made[1].keys) == 7 and starts.made[0].stopped and own.holds

    starts.held = False  # the next one's creates not answered yet: the old one goes on
    own.only([("web", "a")])  # the others followed by a watch now
    wait_until(lambda: len(starts.made) == 3, 2, "the next one")
    assert not starts.made[1].stopped and not own.holds  # (hold_wait: 5 s)
    starts.made[2].revision = 9  # it holds: the old one stopped
    wait_until(lambda: starts.made[1].stopped, 2, "the old one stopped")
    assert starts.made[2].keys == {("web", "a")} and own.holds
    own.only([])  # none left: stopped at once, no stream
    wait_until(lambda: starts.made[2].stopped, 1, "stopped")
    assert len(starts.made) == 3
    own.only([("api", "c")])
    own.close()
    assert all(w.stopped for w in starts.made)


def test_etcd_replaces_it_within_most_seconds_of_a_steady_stream_of_changes() -> None:
    starts = Starts()
    own = OwnKeys(starts, settle=0.3, most=0.6)
    keys = [("web", "a")]
    own.only(keys)
    wait_until(lambda: len(starts.made) == 1, 2, "the first stream")
    began = time.monotonic()
    n = 0
    while len(starts.made) == 1 and time.monotonic() - began < 3:  # every 0.1 s, unsettled
        keys.append(("web", f"b{n}"))
        own.only(keys)
        n += 1
        time.sleep(0.1)  # (the pace of the registrations, not a wait)
    assert len(starts.made) == 2 and time.monotonic() - began < 1.2, n
    own.close()


def test_etcd_keeps_the_old_stream_when_the_new_one_does_not_hold() -> None:
    starts = Starts()
    own = OwnKeys(starts, settle=0.1, hold_wait=0.3)
    a, b = ("web", "a"), ("web", "b")
    own.only([a])
    wait_until(lambda: len(starts.made) == 1, 2, "the first stream")
    starts.held = False  # a member slow, a link cut: the next one's creates not answered
    own.only([a, b])
    wait_until(lambda: len(starts.made) == 2 and starts.made[1].stopped, 2, "given up")
    assert not starts.made[0].stopped and not own.holds  # the old one goes on
    starts.held = True
    wait_until(lambda: len(starts.made) == 3, 2, "tried again after hold_wait")
    wait_until(lambda: starts.made[0].stopped and own.holds, 2, "replaced")
    assert starts.made[2].keys == {("web", "a"), ("web", "b")}
    own.only([a])  # back and forth while it settles: the last set wins
    own.only([a, b])
    own.only([a])
    wait_until(lambda: len(starts.made) == 4 and own.holds, 2, "the last set")
    assert starts.made[3].keys == {("web", "a")}
    own.close()
