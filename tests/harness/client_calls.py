"""What the client and lookup tests share: instances of a service numbered by port, a small
catalog of them, and a watch callback that records the port lists it is given."""

from __future__ import annotations

import threading
from typing import Any

from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot
from tests.harness.util import wait_for


def inst(service: str, n: int, **kw: Any) -> Instance:
    return Instance(service=service, id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=8000 + n, **kw)


def sample_catalog() -> Catalog:
    """web: 1 (blue, v2), 2 (green), 3 (blue, draining); db: 4; at revision 10."""
    cat = Catalog()
    members = [inst("web", 1, tags=("blue", "v2")), inst("web", 2, tags=("green",)),
               inst("web", 3, tags=("blue",), state=State.DRAINING), inst("db", 4)]
    cat.load(Snapshot({i.key: i for i in members}, revision=10))
    return cat


def ports(instances: list[Instance]) -> list[int]:
    return [i.port for i in instances]


class Recorder:
    """A watch callback that records every list it is given (as port lists)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, instances: list[Instance]) -> None:
        with self._lock:
            self.calls.append(ports(instances))
            self.threads.add(threading.current_thread().name)

    def wait(self, count: int, timeout: float = 15.0) -> list[list[int]]:
        wait_for(lambda: len(self.calls) >= count, timeout=timeout,
                 message=f"{count} callback(s), have {self.calls}")
        return self.calls[:count]

    def settle(self, steps: list[list[int]], timeout: float = 15.0) -> None:
        """Wait for the last of ``steps``, then check the calls went through them in order:
        the first and the last, each step at most once, no list that is not one of them
        (changes that came while one was delivered make one call, with the newest list: a
        step may be skipped). ``steps`` must not end as they begin."""
        assert steps[-1] != steps[0] or len(steps) == 1, steps
        wait_for(lambda: self.calls and self.calls[-1] == steps[-1], timeout=timeout,
                 message=f"the list {steps[-1]}, have {self.calls}")
        at = 0
        for n, call in enumerate(self.calls):
            assert call in steps[at + (n > 0):], (self.calls, steps)  # onwards, never again
            at = steps.index(call, at + (n > 0))
        assert self.calls[0] == steps[0], (self.calls, steps)
