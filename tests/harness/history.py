"""What the tests of a registry that went back in time share (etcd restored from a backup,
a ZooKeeper ensemble that lost its data): the instances, the watch's ``reset``, and a host
that registers once the registry is back."""

from __future__ import annotations

from discovery.model import Instance
from discovery.registry import Change, Snapshot, open_registry
from tests.harness.servers import wait_until


def instance(n: int) -> Instance:
    return Instance(service="web", id=f"h{n}:00000000000{n}:8{n}", node=f"h{n}",
                    address="127.0.0.1", port=8000 + n)


def first_reset(changes: list[Change], since: int) -> Snapshot | None:
    """The snapshot of the first ``reset`` in ``changes[since:]``."""
    return next((c.snapshot for c in changes[since:] if c.kind == "reset"), None)


def a_late_put_arrives(url: str, ttl: float, changes: list[Change], since: int) -> None:
    """Another host registers ``instance(9)``: the watch that fills ``changes`` delivers it."""
    late = open_registry(url, ttl=ttl)
    try:
        late.register(instance(9))
        wait_until(lambda: any(c.key == instance(9).key for c in changes[since:]), 10,
                   "a put made once the registry was back, through the watch")
    finally:
        late.close()
