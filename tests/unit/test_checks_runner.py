"""discovery.agent.health: rise/fall, the runner and the scheduler it runs on."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from discovery.agent.health import CheckRunner, CheckScheduler, Hysteresis, run_check
from discovery.agent.spec import CheckResult, CheckSpec
from discovery.errors import CheckError
from tests.harness.util import wait_for

# ---- hysteresis ------------------------------------------------------------------------------

SEQUENCES = [
    # (rise, fall, start healthy, observations, expected returns)
    (1, 1, False, "+-+", [True, False, True]),
    (2, 3, False, "++", [None, True]),
    (2, 3, False, "+-+", [None, None, None]),
    (2, 3, False, "++---", [None, True, None, None, False]),
    (2, 3, False, "++--+---", [None, True, None, None, None, None, None, False]),
    (3, 2, True, "--", [None, False]),
    (3, 2, True, "-+-", [None, None, None]),
    (3, 2, True, "++++", [None, None, None, None]),
    (3, 2, False, "---", [None, None, None]),
    (2, 2, False, "++++--++", [None, True, None, None, None, False, None, True]),
]


@pytest.mark.parametrize(("rise", "fall", "healthy", "seq", "want"), SEQUENCES)
def test_hysteresis(rise: int, fall: int, healthy: bool, seq: str, want: list[bool | None]) -> None:
    h = Hysteresis(rise, fall, healthy)
    got = []
    state = healthy
    for c in seq:
        changed = h.observe(c == "+")
        got.append(changed)
        state = state if changed is None else changed
        assert h.healthy is state
    assert got == want


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2)])
def test_hysteresis_bounds(rise: int, fall: int) -> None:
    with pytest.raises(CheckError, match="rise and fall must be >= 1"):
        Hysteresis(rise, fall)


# ---- runner ----------------------------------------------------------------------------------


class Scripted:
    """Returns results from a script (then repeats the last); records call times."""

    def __init__(self, script: list[Any], delay: float = 0.0) -> None:
        self.script, self.delay = list(script), delay
        self.times: list[float] = []

    def run(self) -> CheckResult:
        self.times.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)  # the check's own run time (simulated work)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]


OK, BAD = CheckResult(True, "ok"), CheckResult(False, "bad")


def test_run_check_never_raises() -> None:
    assert run_check(Scripted([ValueError("x" * 500)])).output.startswith("check raised ValueError")
    assert run_check(Scripted([True])) == CheckResult(True, "ok")
    assert run_check(Scripted([False])) == CheckResult(False, "failed")
    assert not run_check(Scripted(["yes"])).ok


def test_runner_run_once_transitions(check_scheduler: CheckScheduler) -> None:
    seen: list[tuple[bool, CheckResult]] = []
    runner = CheckRunner(
        CheckSpec(rise=2, fall=1),
        Scripted([OK, OK, RuntimeError("boom"), OK]),
        lambda ok, r: seen.append((ok, r)),
        check_scheduler,
        name="t",
    )
    since = runner.since
    assert [runner.run_once() for _ in range(3)] == [None, True, False]
    assert runner.since >= since and not runner.healthy
    assert seen[0] == (True, OK) and seen[1][0] is False and "boom" in seen[1][1].output
    assert runner.last_result is not None and runner.runs == 3


def test_runner_runs_until_stopped(check_scheduler: CheckScheduler) -> None:
    seen: list[bool] = []
    done = threading.Event()

    def on_transition(ok: bool, result: CheckResult) -> None:
        seen.append(ok)
        if len(seen) == 2:
            done.set()

    check = Scripted([OK, BAD, BAD, OK])
    runner = CheckRunner(CheckSpec(interval=0.02, rise=1, fall=2), check, on_transition,
                         check_scheduler).start()
    assert done.wait(2)
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 0.5 and not runner.running
    assert seen[:2] == [True, False]


def test_runner_first_run_immediate_and_no_drift(check_scheduler: CheckScheduler) -> None:
    check = Scripted([OK], delay=0.03)
    started = time.monotonic()
    runner = CheckRunner(CheckSpec(interval=0.1), check, lambda ok, r: None,
                         check_scheduler).start()
    time.sleep(1.05)  # a measurement window: the runs' timing is what is tested
    runner.stop()
    assert check.times[0] - started < 0.05
    # 0.03s of work per 0.1s tick must not stretch the period: ~11 runs, not ~8
    assert 9 <= len(check.times) <= 12
    gaps = [b - a for a, b in zip(check.times, check.times[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.015)


def test_runner_overrun_skips_ticks(check_scheduler: CheckScheduler) -> None:
    check = Scripted([OK], delay=0.25)
    runner = CheckRunner(CheckSpec(interval=0.1), check, lambda ok, r: None,
                         check_scheduler).start()
    time.sleep(0.9)  # a measurement window: the runs' timing is what is tested
    runner.stop()
    gaps = [b - a for a, b in zip(check.times, check.times[1:], strict=False)]
    assert gaps and all(g >= 0.25 for g in gaps)  # no burst of catch-up runs
    assert sum(gaps) / len(gaps) == pytest.approx(0.3, abs=0.05)  # next free tick of the 0.1s grid


def test_runner_survives_exceptions_and_bad_callbacks(check_scheduler: CheckScheduler) -> None:
    calls: list[bool] = []

    def on_transition(ok: bool, result: CheckResult) -> None:
        calls.append(ok)
        raise RuntimeError("callback bug")

    check = Scripted([RuntimeError("a"), OK, RuntimeError("b"), RuntimeError("c"), OK])
    runner = CheckRunner(CheckSpec(interval=0.01, fall=2), check, on_transition, check_scheduler,
                         healthy=True)
    runner.start()
    wait_for(lambda: len(calls) >= 2, 2, interval=0.01, message="two transitions")
    assert runner.running
    runner.stop()
    assert calls[:2] == [False, True]


def test_runner_stop_quickly_with_long_interval(check_scheduler: CheckScheduler) -> None:
    runner = CheckRunner(CheckSpec(interval=3600), Scripted([OK]), lambda ok, r: None,
                         check_scheduler).start()
    wait_for(lambda: runner.runs >= 1, 2, interval=0.01, message="the first run")  # now idle
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 0.2 and not runner.running


def test_runner_no_callback_after_stop(check_scheduler: CheckScheduler) -> None:
    calls: list[bool] = []
    gate, entered = threading.Event(), threading.Event()

    class Slow:
        def run(self) -> CheckResult:
            entered.set()
            gate.wait(2)
            return OK

    runner = CheckRunner(
        CheckSpec(interval=0.01, timeout=2), Slow(), lambda ok, r: calls.append(ok),
        check_scheduler,
    )
    runner.start()
    assert entered.wait(2), "the check never ran"
    runner.stop()  # returns at once, while the run is still going
    assert not runner.running and runner.runs == 0
    gate.set()  # the run ends healthy (rise = 1), after stop()
    wait_for(lambda: runner.runs == 1, 2, interval=0.01, message="the run in progress to end")
    assert calls == [] and runner.healthy  # the state changed, but no callback was made


def test_runner_stop_from_callback(check_scheduler: CheckScheduler) -> None:
    holder: list[CheckRunner] = []
    runner = CheckRunner(CheckSpec(interval=0.01), Scripted([OK]), lambda ok, r: holder[0].stop(),
                         check_scheduler)
    holder.append(runner)
    runner.start()
    wait_for(lambda: not runner.running, 2, interval=0.01, message="the runner to stop itself")
    assert runner.runs == 1


def test_scheduler_runs_many_checks_on_few_threads() -> None:
    """CheckScheduler: every runner keeps its interval, never overlaps itself, stops cleanly."""
    import threading as _threading

    from discovery.agent.health import CheckRunner, CheckScheduler

    class Counting:
        def __init__(self) -> None:
            self.runs = 0
            self.active = 0
            self.overlap = False

        def run(self) -> CheckResult:
            self.active += 1
            self.overlap |= self.active > 1
            self.runs += 1
            time.sleep(0.01)  # simulated work: long enough for an overlap to show
            self.active -= 1
            return CheckResult(True, "ok")

    before = _threading.active_count()
    scheduler = CheckScheduler(workers=4)
    checks = [Counting() for _ in range(40)]
    seen: list[bool] = []
    runners = [CheckRunner(CheckSpec(type="none", interval=0.1, rise=1, fall=1), c,
                           lambda ok, _r: seen.append(ok), scheduler=scheduler).start()
               for c in checks]
    started = time.monotonic()
    deadline = started + 10  # every runner gets its turns on the 4 workers (polled, not timed)
    while min(c.runs for c in checks) < 3:
        assert time.monotonic() < deadline, [c.runs for c in checks]
        assert _threading.active_count() - before <= 1 + 4  # the timer + the workers, not 40
        time.sleep(0.02)
    for r in runners:
        r.stop()
    scheduler.stop()
    elapsed = time.monotonic() - started
    # none faster than its interval (0.1 s): at most one run a tick, and the first at once
    assert all(c.runs <= elapsed / 0.1 + 2 for c in checks), ([c.runs for c in checks], elapsed)
    assert not any(c.overlap for c in checks)
    assert seen.count(True) == 40  # one transition each
