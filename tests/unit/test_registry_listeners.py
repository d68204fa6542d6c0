"""Registry state listeners run with no registry lock held (bench/faults.py found a deadlock:
the agent's listener waited for the agent's lock while a thread holding it waited for the
registry's state lock); when a failed etcd lease renewal is tried again."""

from __future__ import annotations

import threading
import time

from discovery.registry import open_registry
from discovery.registry.etcd_keepalive import retry_wait


def test_etcd_listeners_run_without_the_state_lock() -> None:
    reg = open_registry("etcd://127.0.0.1:1/x", timeout=0.5)  # nothing listens: no I/O here
    seen: list[tuple[bool, bool]] = []

    lock = reg._state.lock  # type: ignore[attr-defined]

    def try_lock(got: list[bool]) -> None:
        got.append(lock.acquire(timeout=2))
        if got[-1]:
            lock.release()

    def listener(up: bool) -> None:  # as the agent's: another thread needs the lock meanwhile
        got: list[bool] = []
        other = threading.Thread(target=try_lock, args=(got,))
        other.start()
        other.join()
        seen.append((up, got[0]))

    try:
        reg.add_state_listener(listener)
        reg.set_state(True)  # type: ignore[attr-defined]
        reg.set_state(False)  # type: ignore[attr-defined]
        assert seen == [(True, True), (False, True)]
    finally:
        reg.close(revoke=False)


def test_etcd_failed_renewal_retried_spread_and_before_the_lease_runs_out() -> None:
    """One renewal interval later (±50 %) while the lease has time, so a fleet's renewals after
    a registry restart arrive as spread as in steady state; sooner as it runs out (at most half
    of what is left); once it has run out (its instances are gone) every 0.8 s (±50 %): back
    within about a second of the link, never a busy retry."""
    for age, low, high in [(0, 1.5, 4.5), (8, 0.25, 0.75), (8.9, 0.1, 0.3),
                           (9.5, 0.4, 1.2), (60, 0.4, 1.2)]:  # age: since the last renewal
        waits = [retry_wait(9, 3.0, time.monotonic() - age) for _ in range(200)]
        assert low <= min(waits) and max(waits) <= high, (age, waits)
        assert max(waits) - min(waits) > (high - low) / 2  # spread, not one value
