"""etcd lease renewals ride one long-lived LeaseKeepAlive stream (etcd_keepalive), counted by
etcd itself in its /metrics: many renewals, one stream; a stream whose member is SIGKILLed
is opened again on another member before the lease runs out; a member that has answered
renewals at once is not asked its status when one is slow (the probe is for proxies)."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.etcd import EtcdRegistry
from discovery.registry.etcd_keepalive import FAST, PROMPT
from tests.harness.servers import ServerCluster, unique_prefix, wait_until

pytestmark = pytest.mark.integration


def grpc_counts(cluster: ServerCluster, member: int, method: str) -> tuple[float, float]:
    """(``method`` calls or streams started, messages received for it) on one member."""
    host, port = cluster.address(member)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def metric(name: str) -> float:
        pattern = rf'^{name}{{[^}}]*grpc_method="{method}"[^}}]*}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    return metric("grpc_server_started_total"), metric("grpc_server_msg_received_total")


def keepalive_counts(cluster: ServerCluster, member: int) -> tuple[float, float]:
    """(LeaseKeepAlive streams started, keepalive messages received) on one member."""
    return grpc_counts(cluster, member, "LeaseKeepAlive")


@pytest.fixture
def registry(etcd_single: ServerCluster) -> Iterator[EtcdRegistry]:
    reg = open_registry(etcd_single.url(unique_prefix()), ttl=1.0, timeout=3.0)
    assert isinstance(reg, EtcdRegistry)
    yield reg
    reg.close()


def test_renewals_share_one_stream(etcd_single: ServerCluster, registry: EtcdRegistry) -> None:
    started0, received0 = keepalive_counts(etcd_single, 0)
    registry.register(Instance(service="web", id="n1:000000000001:80", node="n1",
                               address="127.0.0.1", port=80))
    # TTL 1 s: a renewal every ~0.33 s. Ten renewals take ~3.3 s.
    wait_until(lambda: keepalive_counts(etcd_single, 0)[1] - received0 >= 10, 8,
               "ten lease renewals counted by etcd")
    started = keepalive_counts(etcd_single, 0)[0] - started0
    assert started == 1, f"{started:g} LeaseKeepAlive streams for one registry's renewals"


def test_a_killed_members_stream_moves_on(etcd_cluster3: ServerCluster) -> None:
    """SIGKILL of the member holding the keepalive stream: renewals go on through another
    member, and the instance outlives its TTL (1 s) by far."""
    etcd_cluster3.ensure_running()
    url = etcd_cluster3.url(unique_prefix())
    reg = open_registry(url, ttl=1.0, timeout=3.0)
    reader = open_registry(url, ttl=1.0, timeout=3.0)
    assert isinstance(reg, EtcdRegistry)
    try:
        inst = Instance(service="web", id="n1:000000000002:80", node="n1",
                        address="127.0.0.1", port=80)
        reg.register(inst)

        def streams() -> list[float]:
            return [keepalive_counts(etcd_cluster3, m)[0] for m in range(3)]

        before = streams()
        wait_until(lambda: any(a > b for a, b in zip(streams(), before, strict=True)), 5,
                   "the keepalive stream opened on a member")
        holder = next(m for m, (a, b) in enumerate(zip(streams(), before, strict=True))
                      if a > b)
        etcd_cluster3.kill_member(holder)
        killed_at = time.monotonic()
        checked_until = killed_at
        while checked_until < killed_at + 4.0:  # four TTLs past the kill
            assert time.monotonic() < killed_at + 15.0, "no read succeeded after the kill"
            try:
                seen = inst.key in reader.snapshot().instances
            except RegistryError:  # a read during the election the kill may cause: again
                time.sleep(0.2)
                continue
            assert seen, f"lease expired {time.monotonic() - killed_at:.1f}s after the kill"
            checked_until = time.monotonic()
            time.sleep(0.2)
        # a read that saw the instance more than 4 TTLs after the kill: the lease lived on
        assert checked_until - killed_at >= 4.0
    finally:
        reg.close()
        reader.close()
        etcd_cluster3.ensure_running()


def test_a_member_that_answered_fast_is_not_asked_its_status(etcd_single: ServerCluster,
                                                              registry: EtcdRegistry) -> None:
    """A renewal the member leaves unanswered half-way through the client's timeout asks the
    member's status (the probe that tells a proxy), unless the member has answered PROMPT
    renewals within FAST: after a full restart every host would ask it of the busy members.
    SIGSTOP of the member for 0.9 s (TTL 1 s: the timeout 1 s, one renewal outstanding, sent
    0-0.37 s into the pause, so unanswered for 0.53-0.9 s): counted by etcd, no Status call,
    and the renewal is answered once the member runs again, the registry never down."""
    downs: list[bool] = []
    registry.add_state_listener(lambda up: None if up else downs.append(up))
    registry.register(Instance(service="web", id="n1:000000000003:80", node="n1",
                               address="127.0.0.1", port=80))
    renewals = registry._renewals  # what the stream has seen of the member
    wait_until(lambda: max(renewals._prompt.values(), default=0) >= PROMPT, 15,
               f"{PROMPT} renewals answered within {FAST}s")
    status_before = grpc_counts(etcd_single, 0, "Status")[0]
    received_before = keepalive_counts(etcd_single, 0)[1]
    proc = etcd_single.procs[0].popen
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.9)  # the fault's length (one renewal outstanding through it)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: keepalive_counts(etcd_single, 0)[1] >= received_before + 3, 5,
               "renewals after the pause")
    assert grpc_counts(etcd_single, 0, "Status")[0] == status_before, "the member was probed"
    assert downs == [], "a paused member's slow renewal reported the registry down"
