"""discovery.registry.etcd_aio: the loop thread the etcd streams run on, and its tasks."""

from __future__ import annotations

import asyncio
import threading
import time

from discovery.registry.etcd_aio import LoopThread


def test_a_stopped_task_has_ended_its_cleanup_when_stop_returns() -> None:
    loop = LoopThread("test-loop")
    cleaned, running = threading.Event(), threading.Event()

    async def work() -> None:
        try:
            running.set()
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # cleanup that itself waits on the loop
            cleaned.set()

    try:
        task = loop.start(work())
        assert running.wait(5)
        t0 = time.monotonic()
        task.stop(5)
        assert cleaned.is_set()  # stop() returned after the task's finally, not before
        assert 0.2 <= time.monotonic() - t0 < 2.0
    finally:
        loop.close()


def test_a_task_stopped_before_it_ever_ran_does_not_hold_stop() -> None:
    loop = LoopThread("test-loop")
    ran = threading.Event()

    async def work() -> None:
        ran.set()

    try:
        gate = threading.Event()
        loop.loop.call_soon_threadsafe(gate.wait, 5)  # the loop busy: the task cannot start
        task = loop.start(work())
        t0 = time.monotonic()
        threading.Timer(0.1, gate.set).start()
        task.stop(5)
        assert time.monotonic() - t0 < 2.0  # not the 5 s of a wait for a finally never run
        assert not ran.is_set()
    finally:
        loop.close()


def test_submit_returns_the_coroutines_result_and_the_executor_runs_blocking_work() -> None:
    loop = LoopThread("test-loop", workers=2)

    async def blocking() -> str:
        return await asyncio.to_thread(lambda: threading.current_thread().name)

    try:
        assert loop.submit(blocking()).result(5).startswith("test-loop")
    finally:
        loop.close()


def test_the_liveness_pulse_reads_only_when_needed_and_outlives_failed_reads() -> None:
    from discovery.errors import RegistryUnavailable
    from discovery.registry.etcd_pulse import pulse

    needed = threading.Event()  # set: the registry holds no lease
    answers: list[BaseException | None] = [RegistryUnavailable("down"), ValueError("bug"), None]
    reads: list[float] = []

    def read() -> None:
        reads.append(time.monotonic())
        answer = answers.pop(0) if answers else None
        if answer is not None:
            raise answer

    async def run() -> None:
        task = asyncio.ensure_future(pulse(0.02, needed.is_set, read))
        await asyncio.sleep(0.2)
        assert reads == []  # a registry with a lease: its renewals tell, no read
        needed.set()
        while len(reads) < 4:  # a failed read (ours or a bug) does not end the pulse
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), 5))
    assert answers == [] and len(reads) >= 4
