"""Which owned keys a registry watches alone (those no running watch follows), and etcd's one
stream of them: replaced once the set settles, the old one stopped once the new one holds
(kept, and the replacement tried again later, when it does not)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from kazoo.protocol.states import KazooState

from discovery.model import Instance
from discovery.registry import etcd_own
from discovery.registry.etcd_own import OwnKeys, by_service, own_hint, own_keys
from discovery.registry.owned import Restorer
from discovery.registry.url import RegistryURL
from discovery.registry.zk_own import OwnNodes
from tests.harness.servers import wait_until


def inst(service: str, n: int) -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=80)


@dataclass
class FakeWatch:
    keys: frozenset[tuple[str, str]]
    revision: int = 0  # etcd answered its creates: > 0 (or it started from a revision)
    stopped: bool = False
    since: int = 0  # the revision it was started from (that of the watch it replaced)
    resuming: bool = False  # its stream broke, none has held since (it waits OWN_LATER)

    def stop(self) -> None:
        self.stopped = True


@dataclass
class Starts:
    made: list[FakeWatch] = field(default_factory=list)
    held: bool = True  # each new watch holds its watchers at once

    def __call__(self, keys: frozenset[tuple[str, str]], since: int) -> FakeWatch:
        w = FakeWatch(keys, revision=since or (7 if self.held else 0), since=since)
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
    assert [w.since for w in starts.made] == [0, 0]  # the old one held: from etcd's now

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


class FakeKazoo:
    """What OwnNodes asks of a KazooClient: its listeners and the last zxid seen."""

    def __init__(self) -> None:
        self.last_zxid = 41
        self.listeners: list[object] = []

    def add_listener(self, fn: object) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: object) -> None:
        self.listeners.remove(fn)


def _nodes() -> tuple[OwnNodes, list[tuple[int, int]]]:
    own = OwnNodes(FakeKazoo(), lambda key: None, lambda *a: None, lambda change: None,
                   timeout=1.0, spread=100.0)  # its re-arm due 300 to 2,000 s later
    rearmed: list[tuple[int, int]] = []
    own._rearm_from = lambda zxid, drops: rearmed.append((zxid, drops))  # type: ignore
    return own, rearmed


def test_a_zookeeper_re_arm_after_a_reconnect_is_one_due_later_a_flap_defers_it_not() -> None:
    own, rearmed = _nodes()
    own._on_state(KazooState.SUSPENDED)
    own._on_state(KazooState.CONNECTED)
    timer = own._timer
    assert timer is not None and 300.0 <= timer.interval <= 2000.0  # 3 to 20 spreads
    own._on_state(KazooState.SUSPENDED)  # the link flaps: the re-arm due stays as it is
    own._on_state(KazooState.CONNECTED)
    assert own._timer is timer and timer.is_alive()
    timer.cancel()
    own._due()  # a timer no longer the one due (cancelled, then late): nothing
    assert rearmed == [] and own._timer is timer
    due = own._timer = threading.Thread(target=own._due)  # the one due fires
    due.start()
    due.join(5)
    assert rearmed == [(41, 2)] and own._timer is None  # from the earliest zxid not re-armed
    own.close()


def test_a_zookeeper_session_lost_cancels_the_re_arm_due_its_recovery_re_arms() -> None:
    own, rearmed = _nodes()
    own._on_state(KazooState.SUSPENDED)
    own._on_state(KazooState.CONNECTED)
    timer = own._timer
    assert timer is not None
    own._on_state(KazooState.SUSPENDED)
    own._on_state(KazooState.LOST)  # a new session: rearm() after the recovery's writes
    assert own._timer is None and timer.finished.is_set()
    own._on_state(KazooState.CONNECTED)  # the new session's: nothing due
    assert own._timer is None and rearmed == []
    own.close()


def test_etcd_replaces_a_stream_that_waits_to_resume_from_its_revision() -> None:
    """A stream whose link broke waits OWN_LATER spreads to resume and owes what happened
    since its revision: its replacement starts from there (etcd replays it). One that holds
    is replaced from etcd's revision then, and kept until the new one holds."""
    starts = Starts()
    own = OwnKeys(starts, settle=0.1, most=5.0, hold_wait=5.0)
    own.only([("web", "a")])
    wait_until(lambda: len(starts.made) == 1, 2, "the first stream")
    starts.made[0].resuming = True  # its link broke: it waits to resume
    starts.held = False
    own.only([("web", "a"), ("web", "b")])
    wait_until(lambda: len(starts.made) == 2, 2, "the replacement")
    assert starts.made[1].since == 7 and starts.made[1].revision == 7
    wait_until(lambda: starts.made[0].stopped, 2, "the old one stopped")
    own.only([("web", "b")])  # the new one holds (not resuming): from now, kept until held
    wait_until(lambda: len(starts.made) == 3, 2, "the next one")
    assert starts.made[2].since == 0 and not starts.made[1].stopped and not own.holds
    own.close()


@dataclass
class UrlOnly:
    url: RegistryURL


def test_etcd_own_off_watches_no_key_of_its_own_keys_and_services_do() -> None:
    """``own=off``: no watch of the host's own keys (the agent's reconcile alone); ``keys``
    (default) and ``services`` (behind etcd grpc-proxy, :func:`etcd_own.watch_keys`) do."""
    def wrap(callback: object, services: object) -> object:
        raise AssertionError("no watch is started here")

    for own, watched in (("off", False), ("keys", True), ("services", True), ("", True)):
        url = RegistryURL.parse("etcd://127.0.0.1:1/p" + (f"?own={own}" if own else ""))
        made = own_keys(UrlOnly(url), wrap, lambda w: w)  # type: ignore[arg-type]
        assert (made is not None) == watched, own
        if made is not None:
            made.close()


def test_etcd_own_services_watches_the_prefixes_of_its_keys_services_never_wide(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``own=services``: the watch's ranges are its keys' services' prefixes (``/``-ended: a
    range each), passed as ``keys`` so that it never resumes wide; ``keys``: the keys."""
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(etcd_own, "EtcdWatch", lambda *a, **kw: made.append(kw))
    keys = frozenset({("web", "n1:000000000001:80"), ("web", "n1:000000000002:80"),
                      ("api", "n1:000000000003:80")})
    for own in ("services", "keys"):
        url = RegistryURL.parse(f"etcd://127.0.0.1:1/p?own={own}")
        etcd_own.watch_keys(UrlOnly(url), lambda change: None, keys)  # type: ignore[arg-type]
    assert sorted(made[0]["keys"]) == ["/p/services/api/", "/p/services/web/"]
    assert sorted(made[1]["keys"]) == sorted(url.key(*k) for k in keys)


def test_etcd_own_services_replaces_its_stream_only_for_a_new_service_or_node() -> None:
    """With ``own=services`` a new key of a service and node already watched changes no watch
    (the watch covers it); one of another service does."""
    starts = Starts()
    own = OwnKeys(starts, settle=0.1, most=5.0, hold_wait=5.0, cover=by_service)
    try:
        own.only([inst("web", 1).key])
        wait_until(lambda: len(starts.made) == 1 and own.holds, 5, "the first watch")
        own.only([inst("web", 1).key, inst("web", 2).key])  # web on node-1: covered
        assert own.holds  # at once: nothing to replace
        own.only([inst("web", 1).key, inst("web", 2).key, inst("api", 3).key])
        wait_until(lambda: len(starts.made) == 2 and own.holds, 5, "a watch of api too")
        assert len(starts.made) == 2 and starts.made[0].stopped and not starts.made[1].stopped
        assert starts.made[1].keys == {inst(s, n).key for s, n in
                                       (("web", 1), ("web", 2), ("api", 3))}
    finally:
        own.close()


def test_a_late_etcd_tells_of_own_services_only_with_own_keys() -> None:
    """The hint logged when etcd answers renewals as a proxy does: only with the default
    ``own=keys`` and keys of the host's own watched alone, which a proxy cannot coalesce."""
    watching, none = OnlyRecorder(), OnlyRecorder()
    watching.only([inst("web", 1).key])
    hints = {own: own_hint(RegistryURL.parse(f"etcd://h/p?own={own}"), watching)
             for own in ("keys", "services", "off")}
    assert "own=services" in hints["keys"] and hints["services"] == hints["off"] == ""
    url = RegistryURL.parse("etcd://h/p")  # keys, but none watched alone (`discovery up`)
    assert own_hint(url, none) == own_hint(url, None) == ""
