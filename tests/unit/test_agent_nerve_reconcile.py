"""The agent's reconcile under Nerve's layout (``zk://…?format=nerve``) compares what the
registry holds with what it wants as the layout carries it (registry/readback.py).

Before, an instance whose Nerve record reads back different from it (meta under a reserved
label name such as ``image``; a zone, which the record did not carry) was written again at
every reconcile, on every host, forever: a fleet-wide write and notify load at rest.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from discovery.agent.history import History
from discovery.agent.registrations import Registrations
from discovery.metrics import Metrics
from discovery.model import Instance
from discovery.model.nerve import as_read
from discovery.registry import RegistryURL, Snapshot
from tests.unit.test_agent_docker import FakeRegistry

ZONED = Instance(service="web", id="h1:abcdefabcdef:80", node="h1", address="192.0.2.1",
                 port=8080, zone="eu1")
META = Instance(service="web", id="h1:abcdefabcdef:81", node="h1", address="192.0.2.1",
                port=8081, meta={"image": "x", "v": "1"})
PLAIN = Instance(service="web", id="h1:abcdefabcdef:82", node="h1", address="192.0.2.1",
                 port=8082)


class NerveRegistry(FakeRegistry):
    """Holds what a reader of Nerve's record gets back of each write."""

    url = RegistryURL.parse("zk://127.0.0.1:1/nerve?format=nerve")

    def register(self, inst: Instance) -> None:
        super().register(inst)
        self.data[inst.key] = read_back(inst)


def reconciled(reg: FakeRegistry, inst: Instance, times: int) -> list[str]:
    """The writes of ``times`` reconciles of ``inst``, written first."""
    regs = Registrations(reg, "h1", Metrics(), History(), lambda: None)  # type: ignore[arg-type]
    try:
        regs.want(inst.key, inst)
        assert regs.flush(5)
        for _ in range(times):
            with regs.turn():
                regs.reconcile(reg.node_snapshot("h1"), {inst.key: inst})
            assert regs.flush(5)
        return [e[0] for e in reg.log]
    finally:
        regs.stop(revoke=False)


@pytest.mark.parametrize("inst", [ZONED, META, PLAIN], ids=["zone", "reserved-meta", "plain"])
def test_an_instance_at_rest_is_written_once(inst: Instance) -> None:
    assert reconciled(NerveRegistry(), inst, 3) == ["put"]


def read_back(inst: Instance) -> Instance:
    read = as_read(inst)
    assert read is not None
    return read


@pytest.mark.parametrize(("inst", "changed"), [
    (META, replace(read_back(META), weight=0)), (ZONED, replace(read_back(ZONED), zone="us2"))],
    ids=["weight", "zone"])
def test_a_record_changed_by_hand_is_still_written_again(inst: Instance,
                                                        changed: Instance) -> None:
    """Compared as the layout carries it, not skipped: a value another writer changed is
    written again at each reconcile that reads it changed."""

    class Changed(NerveRegistry):
        def node_snapshot(self, node: str) -> Snapshot:
            return Snapshot({changed.key: changed})

    assert reconciled(Changed(), inst, 2) == ["put", "put", "put"]
