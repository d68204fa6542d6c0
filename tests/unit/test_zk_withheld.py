"""Withheld: the service directories a ZooKeeper full read could not list, and the instance
nodes it kept though their own ACL refused it, are looked at again, less and less often, until
one may be read or is gone: then a directory's means everything read again, a node's that
node alone."""

from __future__ import annotations

import logging

import pytest
from kazoo.exceptions import NoAuthError, NoNodeError

from discovery.registry.base import Snapshot
from discovery.registry.url import RegistryURL
from discovery.registry.zk_scan import LivePaths
from discovery.registry.zk_setback import Withheld

URL = RegistryURL.parse("zk://127.0.0.1:2181/d")


class Listings:
    """A kazoo client whose listings answer from ``answers`` (an exception or children)."""

    def __init__(self, **answers: object) -> None:
        self.answers, self.asked = answers, []

    def get_children(self, path: str) -> list[str]:
        self.asked.append(path)
        answer = self.answers[path.rpartition("/")[2]]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)  # type: ignore[call-overload]

    get = get_children  # a node's data: the same answers


def test_refused_listings_wait_longer_each_time_and_a_full_read_starts_again() -> None:
    held = Withheld((1.0, 4.0))
    held.scanned(Snapshot(withheld=frozenset({"api", "db"})))
    assert 0.9 <= (held.retry.remaining() or 0) <= 1.1  # the first wait, ±10 %
    client = Listings(api=NoAuthError(), db=NoAuthError())
    assert held.ready(client, URL) == [] and held.ready(client, URL) == []
    assert client.asked == [URL.service_dir("api"), URL.service_dir("db")] * 2  # listed only
    assert 3.6 <= (held.retry.remaining() or 0) <= 4.0  # 1, 2, then 4: the most
    held.scanned(Snapshot())  # a full read withheld nothing: nothing to look at
    assert held.retry.remaining() is None and not held.services


def test_a_directory_that_may_be_listed_or_is_gone_means_read_everything() -> None:
    held = Withheld((1.0, 4.0))
    held.scanned(Snapshot(withheld=frozenset({"api", "db"})))
    assert held.ready(Listings(api=NoAuthError(), db=["n1"]), URL) == [("reset", "")]
    assert held.ready(Listings(api=NoNodeError(), db=NoAuthError()), URL) == [("reset", "")]


def test_kept_nodes_are_looked_at_again_until_each_may_be_read_or_is_gone() -> None:
    """ZooKeeper tells no watch about a node its client may not read, not even its delete:
    a node kept though refused is read again (one request, no listing) after the wait; one
    that may be read, or is gone, is read by the watch alone (before: everything)."""
    held = Withheld((1.0, 4.0))
    n1, n2 = f"{URL.service_dir('web')}/n1", f"{URL.service_dir('web')}/n2"
    held.scanned(Snapshot(), [n1])
    assert 0.9 <= (held.retry.remaining() or 0) <= 1.1
    client = Listings(n1=NoAuthError(), n2=NoAuthError())
    assert held.ready(client, URL) == [] and client.asked == [n1]
    live = LivePaths()
    live.set(n2, ("web", "n2"))
    assert not held.kept(f"{URL.service_dir('web')}/n3", live)  # never read: nothing kept
    assert held.kept(n2, live)  # refused later, to a watch's read: looked at too, wait kept
    assert 1.8 <= (held.retry.remaining() or 0) <= 2.2
    assert held.ready(client, URL) == [] and client.asked == [n1, n1, n2]
    assert held.ready(Listings(n1=NoAuthError(), n2=NoNodeError()), URL) == [("node", n2)]
    assert held.nodes == {n1} and held.retry.remaining() is not None  # (gone) n1 still
    assert held.ready(Listings(n1=b"{}"), URL) == [("node", n1)]  # readable again
    assert not held.nodes and held.retry.remaining() is None  # nothing left to look at
    fresh = Withheld((1.0, 4.0))
    assert fresh.kept(n2, live)  # nothing withheld before: the first wait
    assert 0.9 <= (fresh.retry.remaining() or 0) <= 1.1


def test_nodes_freed_together_are_named_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A script that unlocks (or deletes) thousands of kept nodes at once: one line, five
    named, not a line each."""
    held = Withheld((1.0, 4.0))
    paths = [f"{URL.service_dir('web')}/n{i}" for i in range(8)]
    held.scanned(Snapshot(), paths)
    with caplog.at_level(logging.INFO, logger="discovery.registry.zk_setback"):
        assert len(held.ready(Listings(**{p.rpartition("/")[2]: b"{}" for p in paths}),
                              URL)) == 8
    lines = [r.getMessage() for r in caplog.records if "kept node(s)" in r.getMessage()]
    assert len(lines) == 1 and "read 8 kept node(s)" in lines[0] and lines[0].endswith(" ...")
