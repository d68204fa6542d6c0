"""A script drains every instance in the registry (rewrites each value as ``draining``, or as
weight 0, its stamps kept) under a real watcher and HAProxy with requests flowing: the wipe
guard counts such drains, not stamped by the instances' agent, as a wipe and keeps the instances in
rotation, while the writer, whose watch sees its values changed, writes them back within
its ``spread=``. No request fails; before, every service drained on every host at once."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from discovery.registry import open_registry
from tests.harness.fleet import as_draining, drain_services
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread
from tests.integration.test_wipe_guard import Load, inst

pytestmark = pytest.mark.integration


def test_a_script_draining_every_instance_fails_no_request(registry_url, http_backends,
                                                           start_watcher) -> None:
    a, b, c = http_backends("a", "b", "c")
    listen = {"web": free_port(), "api": free_port()}
    writer = open_registry(f"{registry_url}?spread=1", ttl=5)
    try:
        stamp = time.time()  # as an agent stamps its writes (written_at)
        fleet = [replace(inst("web", 1, a.port), written_at=stamp),
                 replace(inst("web", 2, b.port), written_at=stamp),
                 replace(inst("api", 3, c.port), written_at=stamp)]
        for i in fleet:
            writer.register(i)
        writer.watch(lambda _: None, writer.snapshot().revision)  # as `discovery up`'s
        watcher = start_watcher(registry_url, listen)
        wait_for(lambda: set(spread(listen["web"], 8)) == {"a", "b"}
                 and spread(listen["api"], 2) == {"c": 2}, 15, message="everything served")
        restorer = writer._restorer  # type: ignore[attr-defined]
        with Load(list(listen.values())) as load:
            wait_for(lambda: load.seen["ok"] > 50, 10, message="load running")
            # web's as draining, api's (its only instance) as weight 0: each alone is not a
            # wipe (fewer than min_removed), nor gone if weight 0 went uncounted
            assert drain_services(f"{registry_url}?spread=1", rewrite=lambda i: replace(
                i, weight=0) if i.service == "api" else as_draining(i)) == 3
            wait_for(lambda: restorer.restored == 3, 5, message="the values written back")
            wait_for(lambda: all(i.serving for i in writer.snapshot().instances.values()), 5,
                     message="all serving")
            served = load.seen["ok"]
            wait_for(lambda: load.seen["ok"] > served + 50, 10, message="more load")
        assert set(load.seen) == {"ok"}, f"a request failed while drained: {load.seen}"
        assert "wipe guard engaged" in watcher.log()
        wait_for(lambda: set(spread(listen["web"], 8)) == {"a", "b"}, 10,
                 message="both web instances served again")
    finally:
        writer.close(revoke=True)
