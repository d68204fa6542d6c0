"""``zk_rewatch.CatchUp``: a re-arm's catch-up ends on kazoo's event thread, behind the events
read before its answer, and an earlier re-arm's end never closes a later one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kazoo.protocol.states import Callback

from discovery.registry.zk_rewatch import CatchUp


class Handler:
    """kazoo's handler as far as CatchUp uses it: callbacks queued for one event thread."""

    def __init__(self) -> None:
        self.queue: list[Callable[[], Any]] = []

    def dispatch_callback(self, callback: Any) -> None:
        self.queue.append(lambda: callback.func(*callback.args))

    def run(self) -> None:
        queued, self.queue = self.queue, []
        for fn in queued:
            fn()


class Client:
    def __init__(self) -> None:
        self.handler = Handler()


def test_open_from_the_re_arm_until_the_events_before_its_answer_ran() -> None:
    client, catch_up = Client(), CatchUp()
    assert not catch_up.open
    seen: list[bool] = []
    gen = catch_up.begin()
    event = Callback("watch", lambda: seen.append(catch_up.open), ())  # a catch-up event
    client.handler.dispatch_callback(event)
    catch_up.answered(client, gen)
    assert catch_up.open  # the event thread has not run the end yet
    client.handler.run()
    assert seen == [True] and not catch_up.open


def test_an_earlier_end_does_not_close_a_later_re_arm() -> None:
    client, catch_up = Client(), CatchUp()
    first = catch_up.begin()
    catch_up.answered(client, first)
    second = catch_up.begin()  # the link went again before the first end ran
    client.handler.run()
    assert catch_up.open
    catch_up.answered(client, second)
    client.handler.run()
    assert not catch_up.open


def test_a_re_arm_that_failed_stays_open() -> None:
    client, catch_up = Client(), CatchUp()
    catch_up.begin()  # no answer: the next re-arm ends it
    client.handler.run()
    assert catch_up.open
