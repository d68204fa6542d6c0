"""ZooKeeper reconnects: one quick retry (another member), then at random within the spread."""

from __future__ import annotations

from kazoo.retry import ForceRetryError

from discovery.registry import RegistryURL
from discovery.registry.zk import connection_retry


def sleeps(url: str, ttl: float, attempts: int = 400) -> list[float]:
    retry = connection_retry(RegistryURL.parse(url), ttl)
    slept: list[float] = []
    retry.sleep_func = slept.append
    left = [attempts]

    def attempt() -> None:
        left[0] -= 1
        if left[0]:
            raise ForceRetryError()

    retry(attempt)
    assert len(slept) == attempts - 1
    return slept


def test_first_retry_at_once_then_spread_over_the_window() -> None:
    first, *rest = sleeps("zk://h/p?spread=3", ttl=10)
    assert 0 <= first <= 0.2
    assert all(0 <= s <= 3.0 for s in rest)
    assert min(rest) < 0.3 and max(rest) > 2.7  # over the whole window, not bunched
    assert 1.2 < sum(rest) / len(rest) < 1.8  # an attempt every 1.5 s on average


def test_the_window_stays_below_a_third_of_the_session_timeout() -> None:
    _, *rest = sleeps("zk://h/p?spread=30", ttl=6)
    assert max(rest) <= 2.0
    _, *rest = sleeps("zk://h/p?spread=0", ttl=10)
    assert max(rest) <= 0.1  # spread=0: no window (at most 0.1 s apart)
