"""discovery.watcher.external.wait_worker: a reload is done once the new worker alone answers."""

from __future__ import annotations

from typing import Any

import pytest

from discovery.errors import HAProxyError
from discovery.watcher.external import wait_worker


class Answers:
    """An admin socket whose ``show info`` answers the given pids in turn, then the last."""

    socket_path = "/test/admin.sock"

    def __init__(self, *pids: int) -> None:
        self.pids, self.asked = list(pids), 0

    def pid(self) -> int:
        self.asked += 1
        return self.pids.pop(0) if len(self.pids) > 1 else self.pids[0]


def test_the_old_worker_answering_again_restarts_the_count() -> None:
    runtime: Any = Answers(1, 2, 1, 2, 2, 1, 2, 2, 2, 2)
    assert wait_worker(runtime, lambda pid: pid != 1, timeout=5, interval=0) == 2
    assert runtime.asked == 9  # three answers of 2 in a row, not the first one


def test_no_new_worker_says_which_pid_answered() -> None:
    runtime: Any = Answers(1)
    with pytest.raises(HAProxyError, match=r"no new worker answered within 0\.1s \(last: pid 1\)"):
        wait_worker(runtime, lambda pid: pid != 1, timeout=0.1, interval=0.01)
