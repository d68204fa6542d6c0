"""``etcd_watch.checked``: a linearizable read answered behind what a watch had seen before it
tells that watch (etcd went back in time); one answered at or past it tells no one."""

from __future__ import annotations

from typing import Any, cast

from discovery.registry.etcd_watch import EtcdWatch, checked


class FakeWatch:
    def __init__(self, seen: int) -> None:
        self.seen = seen
        self.told: list[int] = []

    def rewound(self, revision: int) -> None:
        self.told.append(revision)


def watches(*seen: int) -> list[Any]:
    return [FakeWatch(s) for s in seen]


def test_only_the_watches_ahead_of_the_answer_are_told() -> None:
    ws = watches(3, 7, 9)
    assert checked(cast("list[EtcdWatch]", ws), lambda: {"rev": 7}, lambda r: r["rev"]) == {
        "rev": 7}
    assert [w.told for w in ws] == [[], [], [7]]


def test_what_a_watch_sees_during_the_read_does_not_count() -> None:
    """The read started before the watch saw revision 12: an answer at 10 is not behind."""
    [w] = ws = watches(8)

    def read() -> int:
        w.seen = 12  # an event arrives while the read is in flight
        return 10

    assert checked(cast("list[EtcdWatch]", ws), read, lambda r: r) == 10
    assert w.told == []


def test_no_watch_no_check() -> None:
    assert checked([], lambda: 5, lambda r: r) == 5
