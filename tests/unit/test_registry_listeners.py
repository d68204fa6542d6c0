"""Registry state listeners run with no registry lock held (bench/faults.py found a deadlock:
the agent's listener waited for the agent's lock while a thread holding it waited for the
registry's state lock)."""

from __future__ import annotations

import threading

from discovery.registry import open_registry


def test_etcd_listeners_run_without_the_state_lock() -> None:
    reg = open_registry("etcd://127.0.0.1:1/x", timeout=0.5)  # nothing listens: no I/O here
    seen: list[tuple[bool, bool]] = []

    lock = reg._state_lock  # type: ignore[attr-defined]

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
