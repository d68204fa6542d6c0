"""What a ZooKeeper follower's worker has yet to take (registry/zk_pending.py): every answer of a
node in order, none lost when delivering one fails, and the data-change flags."""

from __future__ import annotations

import pytest

from discovery.registry.zk_pending import Answer, Pending


def test_answers_are_delivered_in_order_and_kept_from_the_one_that_failed() -> None:
    pending = Pending()
    for zxid in (1, 2, 3):
        pending.answered("/a", Answer(None, zxid, 0, zxid == 1))
    seen: list[int] = []

    def fails_at_2(answer: Answer) -> None:
        if answer.zxid == 2:
            raise ConnectionError("lost")
        seen.append(answer.zxid)

    with pytest.raises(ConnectionError):
        pending.deliver("/a", fails_at_2)
    assert seen == [1]
    pending.answered("/a", Answer(None, 4, 0, False))  # came meanwhile: after the kept ones
    pending.deliver("/a", lambda answer: seen.append(answer.zxid))
    assert seen == [1, 2, 3, 4]
    pending.deliver("/a", lambda answer: seen.append(answer.zxid))  # nothing twice
    assert seen == [1, 2, 3, 4]


def test_a_change_flag_is_taken_once_and_cleared_with_everything() -> None:
    pending = Pending()
    pending.touch("/a", False)  # a create or a delete: no flag
    assert not pending.untouch("/a")
    pending.touch("/a")
    assert pending.untouch("/a") and not pending.untouch("/a")
    pending.touch("/b")
    pending.answered("/b", Answer(None, 1, 0, True))
    pending.clear()
    assert not pending.untouch("/b")
    pending.deliver("/b", lambda answer: pytest.fail("cleared"))
