"""Withheld: the service directories a ZooKeeper full read could not list are listed again,
less and less often, until one may be (then everything is read again)."""

from __future__ import annotations

from kazoo.exceptions import NoAuthError, NoNodeError

from discovery.registry.base import RegistryURL, Snapshot
from discovery.registry.zk_scan import Withheld

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


def test_refused_listings_wait_longer_each_time_and_a_full_read_starts_again() -> None:
    held = Withheld((1.0, 4.0))
    held.scanned(Snapshot(withheld=frozenset({"api", "db"})))
    assert 0.9 <= (held.retry.remaining() or 0) <= 1.1  # the first wait, ±10 %
    client = Listings(api=NoAuthError(), db=NoAuthError())
    assert not held.readable(client, URL) and not held.readable(client, URL)
    assert client.asked == [URL.service_dir("api"), URL.service_dir("db")] * 2  # listed only
    assert 3.6 <= (held.retry.remaining() or 0) <= 4.0  # 1, 2, then 4: the most
    held.scanned(Snapshot())  # a full read withheld nothing: nothing to look at
    assert held.retry.remaining() is None and not held.services


def test_a_directory_that_may_be_listed_or_is_gone_means_read_everything() -> None:
    held = Withheld((1.0, 4.0))
    held.scanned(Snapshot(withheld=frozenset({"api", "db"})))
    assert held.readable(Listings(api=NoAuthError(), db=["n1"]), URL)
    assert held.readable(Listings(api=NoNodeError(), db=NoAuthError()), URL)
