"""What a filtered etcd watch's wide resume costs when the services it follows are quiet.

A watch of k > 1 services resumes with one watcher on the whole prefix, from the oldest of its
k revisions (discovery/registry/etcd_watch.py). An event of a service it does not follow
advanced nothing, so a quiet followed service kept its old revision, and every next resume
replayed the whole prefix's history since then. Counted with ``Registry.reads``.
"""

from __future__ import annotations

import pytest

from discovery.model import Instance
from discovery.registry import Change, RegistryURL, etcd_watch, open_registry
from tests.harness.fleet import fill_foreign
from tests.harness.servers import wait_until
from tests.harness.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

CHURN = 200  # instances of other services (svc0..svc19), written while web and api are quiet


def web(n: int) -> Instance:
    return Instance(service="web", id=f"node-me:{n:012x}:80", node="node-me",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


def test_a_second_wide_resume_replays_no_history_of_other_services(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two cuts of a watch of web and api (api quiet) while other services churn: the first
    resume replays what changed since api's last revision (etcd sent nothing newer of it);
    the wide stream's every message advances both; after it narrows, the second resume reads
    the one put of web made during the cut, not the churn again."""
    monkeypatch.setattr(etcd_watch, "NARROW_AFTER", (1.0, 1.5))
    parsed = RegistryURL.parse(etcd_url)
    proxy = TcpProxy(parsed.hosts[0])
    writer = open_registry(etcd_url, ttl=10, timeout=5)
    reader = open_registry(proxy.url("etcd", parsed.prefix) + "?spread=0.5", timeout=5)
    try:
        states: list[bool] = []
        reader.add_state_listener(states.append)
        seen: list[Change] = []
        watch = reader.watch(seen.append, reader.snapshot(["web", "api"]).revision,
                             services=["web", "api"])
        assert isinstance(watch, etcd_watch.EtcdWatch)
        writer.register(web(1))
        wait_until(lambda: seen, 10, "the first put")
        fill_foreign(etcd_url, CHURN)
        costs = []
        for n in (2, 3):
            before = reader.reads.counts()
            with proxy.blocked():
                wait_until(lambda: states[-1:] == [False], 10, "the reader to see the link down")
                writer.register(web(n))
            wait_until(lambda: seen[-1].key == web(n).key, 10, "the resume")  # noqa: B023
            assert watch.wide
            fill_foreign(etcd_url, CHURN // 2)  # while wide: every message advances both
            wait_until(lambda: not watch.wide, 5, "the watch back to its k watchers")
            costs.append(reader.reads.counts() - before)
        print(f"first cut: {costs[0].keys} keys, {costs[0].bytes} bytes; "
              f"second: {costs[1].keys} keys, {costs[1].bytes} bytes")
        assert [c.kind for c in seen] == ["put"] * 3
        # from api's revision: web's first put again (not delivered twice), the churn, web's
        # second put, the churn while wide
        assert costs[0].keys == 2 + CHURN + CHURN // 2, costs[0]
        assert costs[1].keys == 1 + CHURN // 2, costs[1]  # web's put and the churn while wide
        assert costs[0].full_reads == costs[1].full_reads == 0
    finally:
        reader.close(revoke=False)
        writer.close(revoke=True)
        proxy.close()
