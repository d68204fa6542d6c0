"""``zk_watch`` after lost connections (``zk_rewatch.Reconnects``): a second drop right after a
re-arm was answered leaves nothing un-armed; the services a follower learned of are counted."""

from __future__ import annotations

import threading
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from kazoo.protocol.states import KazooState

from discovery.registry import RegistryURL
from discovery.registry.decoder import Decoder
from discovery.registry.zk_rewatch import Reconnects, SetWatches
from discovery.registry.zk_watch import ZkWatch
from tests.harness.util import wait_for

URL = RegistryURL.parse("zk://127.0.0.1:2181/p")
ROOT = URL.services_root


class Result:
    def __init__(self) -> None:
        self._set = threading.Event()

    def set(self, value: Any = None) -> None:
        self._set.set()

    def get(self, timeout: float | None = None) -> None:
        assert self._set.wait(timeout)


class Handler:
    def async_result(self) -> Result:
        return Result()

    def dispatch_callback(self, callback: Any) -> None:
        callback.func(*callback.args)


class Client:
    """A kazoo client as far as a watch of an empty registry uses it. ``on_set_watches``: runs
    once a SetWatches was answered, before kazoo hands the answer over."""

    def __init__(self) -> None:
        self.handler = Handler()
        self.last_zxid = 0x10
        self.listeners: list[Any] = []
        self._data_watchers: defaultdict[str, set[Any]] = defaultdict(set)
        self._child_watchers: defaultdict[str, set[Any]] = defaultdict(set)
        self.set_watches: list[SetWatches] = []
        self.on_set_watches = lambda: None

    def add_listener(self, fn: Any) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: Any) -> None:
        self.listeners.remove(fn)

    def state(self, state: str) -> None:
        for fn in list(self.listeners):
            fn(state)

    def get_children(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        assert path == ROOT
        return [], SimpleNamespace(pzxid=self.last_zxid)

    def _call(self, request: Any, result: Result) -> None:
        assert isinstance(request, SetWatches), request
        self.set_watches.append(request)
        result.set()
        self.on_set_watches()


class Router:
    """A server with persistent watches."""

    supported = True

    def add_all(self, roots: Any, fn: Any, timeout: float) -> bool:
        return True

    def remove(self, root: str, fn: Any) -> None:
        pass


def watch_of(client: Client) -> ZkWatch:
    connected = threading.Event()
    connected.set()
    many = SimpleNamespace(each=lambda paths, refused=None: iter(()))
    return ZkWatch(client, Decoder(URL), connected, lambda change: None, 0,
                   router=Router(), many=many)  # type: ignore[arg-type]


def test_a_drop_right_after_a_re_arm_was_answered_is_re_armed_too() -> None:
    client = Client()
    watch = watch_of(client)
    try:
        def drop_again() -> None:  # the link goes (and comes back) before the worker goes on
            client.on_set_watches = lambda: None
            client.last_zxid = 0x20
            client.state(KazooState.SUSPENDED)
            client.state(KazooState.CONNECTED)

        client.on_set_watches = drop_again
        client.state(KazooState.SUSPENDED)
        client.state(KazooState.CONNECTED)
        # the third connection holds the persistent watch again (it was lost with the second)
        wait_for(lambda: len(client.set_watches) == 2, 5, message="a second re-arm")
        assert [list(s.recursive) for s in client.set_watches] == [[ROOT], [ROOT]]
        assert [s.relative_zxid for s in client.set_watches] == [0x10, 0x10]  # the first drop's
        wait_for(lambda: watch._reconnects.zxid is None, 5, message="nothing left to re-arm")
    finally:
        watch.stop()


def test_a_re_arm_no_drop_raced_is_done() -> None:
    reconnects = Reconnects()
    reconnects.dropped(7)
    reconnects.dropped(9)  # a second drop before the re-arm: still from the first zxid
    zxid, drops = reconnects.begin()
    assert zxid == 7
    assert reconnects.done(drops) and reconnects.zxid is None
    reconnects.dropped(11)
    zxid, drops = reconnects.begin()
    reconnects.dropped(12)  # after the answer, before done
    assert not reconnects.done(drops) and reconnects.zxid == 11


def test_services_learned_and_forgotten() -> None:
    reconnects = Reconnects()
    reconnects.learned("web")
    reconnects.learned("api")
    reconnects.learned("web", gone=True)
    assert reconnects.services() == {"api"}
