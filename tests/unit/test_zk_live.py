"""LivePaths: which node holds which instance, both ways (a ZooKeeper follower's deletes)."""

from __future__ import annotations

import time

from discovery.registry.zk_scan import LivePaths

SVC = "/d/services/web"


def test_a_node_holds_one_instance_and_an_instance_may_have_several_nodes() -> None:
    live = LivePaths()
    live.set(f"{SVC}/a_0002", ("web", "a"))
    live.set(f"{SVC}/a_0001", ("web", "a"))  # Nerve: a restarted reporter's old node
    live.set(f"{SVC}/b_0001", ("web", "b"))
    assert len(live) == 3
    assert live.holders(("web", "a")) == [f"{SVC}/a_0001", f"{SVC}/a_0002"]
    assert live.pop(f"{SVC}/a_0001") == ("web", "a")
    assert live.holders(("web", "a")) == [f"{SVC}/a_0002"]
    assert live.pop(f"{SVC}/a_0002") == ("web", "a")
    assert live.holders(("web", "a")) == []
    assert live.pop(f"{SVC}/a_0002") is None  # gone already
    assert live.get(f"{SVC}/b_0001") == ("web", "b") and len(live) == 1


def test_holders_go_from_one_to_several_and_back() -> None:
    live, key = LivePaths(), ("web", "a")
    for name in ("a_0001", "a_0001", "a_0002", "a_0003"):  # the same node twice: once
        live.set(f"{SVC}/{name}", key)
    assert live.holders(key) == [f"{SVC}/a_0001", f"{SVC}/a_0002", f"{SVC}/a_0003"]
    live.pop(f"{SVC}/a_0002")
    live.pop(f"{SVC}/a_0001")
    assert live.holders(key) == [f"{SVC}/a_0003"]
    live.set(f"{SVC}/a_0004", key)
    assert live.holders(key) == [f"{SVC}/a_0003", f"{SVC}/a_0004"]
    live.pop(f"{SVC}/a_0003")
    live.pop(f"{SVC}/a_0004")
    assert live.holders(key) == [] and len(live) == 0


def test_a_node_that_now_holds_another_instance_leaves_the_old_one() -> None:
    live = LivePaths()
    live.set(f"{SVC}/n_0001", ("web", "n:8080"))
    live.set(f"{SVC}/n_0001", ("web", "n:9090"))  # the node now says another port
    assert live.holders(("web", "n:8080")) == []
    assert live.holders(("web", "n:9090")) == [f"{SVC}/n_0001"]
    assert len(live) == 1


def test_finding_the_holders_does_not_walk_every_node() -> None:
    """A follower of a whole fleet's catalog: a delete costs the same at 200 and 50,000."""
    def cost(n: int) -> float:
        live = LivePaths()
        for i in range(n):
            live.set(f"{SVC}/i{i}", ("web", f"i{i}"))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(200):
                live.holders(("web", f"i{i}"))
            best = min(best, time.perf_counter() - t0)
        return best
    small, big = cost(200), cost(50_000)
    assert big < small * 10, (small, big)  # a walk over every node: ~250 x
