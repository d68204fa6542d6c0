"""Turning a stream of check results into a health state (Nerve-style rise/fall)."""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from discovery.agent.checks import clip
from discovery.agent.spec import PER_CONTAINER_CHECKS, Check, CheckResult, CheckSpec
from discovery.errors import CheckError

log = logging.getLogger(__name__)


class Hysteresis:
    """``rise`` consecutive successes make an instance healthy, ``fall`` consecutive
    failures make it unhealthy; anything in between keeps the current state."""

    def __init__(self, rise: int, fall: int, healthy: bool = False) -> None:
        if rise < 1 or fall < 1:
            raise CheckError(f"rise and fall must be >= 1 (got rise={rise}, fall={fall})")
        self.rise, self.fall = rise, fall
        self._healthy = healthy
        self._streak = 0  # consecutive results that disagree with the current state

    @property
    def healthy(self) -> bool:
        return self._healthy

    def observe(self, ok: bool) -> bool | None:
        """Feed one result; return the new state on a transition, else ``None``."""
        if ok == self._healthy:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self.rise if ok else self.fall):
            return None
        self._healthy, self._streak = ok, 0
        return ok


def run_check(check: Check) -> CheckResult:
    """``check.run()``, with any exception or odd return value turned into a failure."""
    try:
        result = check.run()
    except Exception as exc:
        log.debug("check %r raised", check, exc_info=True)
        return CheckResult(False, clip(f"check raised {type(exc).__name__}: {exc}"))
    if isinstance(result, CheckResult):
        return result
    if isinstance(result, bool):  # lenient with plugins that return a plain bool
        return CheckResult(result, "ok" if result else "failed")
    return CheckResult(False, clip(f"check returned {type(result).__name__}, not CheckResult"))


class CheckRunner:
    """Runs ``check`` every ``spec.interval`` seconds (the first run at once) on
    ``scheduler``'s workers and calls ``on_transition(healthy, result)`` whenever the state
    flips.

    Runs are scheduled on a fixed grid, so slow checks do not make the interval drift;
    when a run overruns one or more ticks, they are skipped rather than bunched up.
    Once :meth:`stop` has returned, no run starts and no ``on_transition`` call begins.
    """

    def __init__(
        self,
        spec: CheckSpec,
        check: Check,
        on_transition: Callable[[bool, CheckResult], None],
        scheduler: CheckScheduler,
        healthy: bool = False,
        name: str = "check",
        on_result: Callable[[bool], None] | None = None,
        group: str | None = None,
    ) -> None:
        self.spec, self.check, self.on_transition, self.name = spec, check, on_transition, name
        # whose share of a scheduler's workers this runner uses (the agent: its container)
        self.group = f"{name}@{id(self):x}" if group is None else group
        self.on_result = on_result  # every result (metrics), not only transitions
        self.scheduler = scheduler  # the timer and workers shared by all runners
        self.hysteresis = Hysteresis(spec.rise, spec.fall, healthy)
        self.last_result: CheckResult | None = None
        self.last_known: CheckResult | None = None  # the last that was a result (not unknown)
        self.last_run: float | None = None
        self.since: float = time.time()  # wall-clock time of the last transition (or start)
        self.runs = 0
        self._stop = threading.Event()

    @property
    def healthy(self) -> bool:
        return self.hysteresis.healthy

    def assume_healthy(self) -> None:
        """Healthy from now, as if started so (an earlier run's registration, adopted late):
        ``fall`` failures make it unhealthy."""
        if not self.hysteresis.healthy:
            self.hysteresis = Hysteresis(self.spec.rise, self.spec.fall, healthy=True)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self) -> CheckRunner:
        self.scheduler.add(self)
        return self

    def stop(self) -> None:
        """Stop without waiting: a run still going ends without calling ``on_transition``."""
        self._stop.set()

    def run_once(self) -> bool | None:
        """One check run: update state and return the new state on a transition."""
        result = run_check(self.check)
        self.runs += 1
        self.last_run = time.time()
        self.last_result = result
        if not result.unknown:
            self.last_known = result
        if result.unknown:  # no result (dockerd unreachable): neither counted nor observed
            return None
        if self.on_result is not None:
            self.on_result(result.ok)
        changed = self.hysteresis.observe(result.ok)
        if changed is None:
            return None
        self.since = time.time()
        log.info(
            "%s: %s after %s (%s)",
            self.name,
            "healthy" if changed else "unhealthy",
            f"{self.spec.rise if changed else self.spec.fall} result(s)",
            result.output,
        )
        if not self._stop.is_set():
            try:
                self.on_transition(changed, result)
            except Exception:
                log.exception("%s: transition callback failed", self.name)
        return changed


class Workers:
    """``count`` daemon threads running what :meth:`submit` queues, every one started here: a
    pool that grows later starts a thread in ``submit``, which at the host's pids limit raised
    after queueing the run (and ended the timer loop: every check stopped); here it fails the
    agent's start. Daemon threads: a run hung on a tarpit or in its container (up to its
    timeout) does not hold the agent's exit, as a ``ThreadPoolExecutor``'s did (the interpreter
    joins its threads at exit: the agent outlived SIGTERM by the check's timeout, past
    ``docker stop``'s 10 s grace, and was killed)."""

    def __init__(self, count: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._count, self._stopped = count, False
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on a worker; RuntimeError once shut down."""
        if self._stopped:
            raise RuntimeError("workers shut down")
        self._queue.put((fn, args))

    def shutdown(self) -> None:
        """Run nothing more: what is queued is dropped, what runs ends on its own."""
        self._stopped = True
        for _ in range(self._count):
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None and not self._stopped:
            try:
                item[0](*item[1])
            except BaseException:  # a plugin's SystemExit too: the worker goes on (as an
                # executor's did); a thread ended by it would be one worker fewer for good
                log.exception("%s failed", getattr(item[0], "__name__", item[0]))


class CheckScheduler:
    """Runs many :class:`CheckRunner` s with one timer thread and a few worker threads, instead
    of a thread per check: an agent with 100 containers keeps ~4 MiB and most idle wake-ups.

    A runner is never run twice at once: it is re-queued only after its run finished, at its
    next tick on a fixed grid (missed ticks are skipped).

    Fair share: at most ``per_group`` runs of one group (the agent's groups are containers)
    hold workers at once; a group's further due runners wait in its own FIFO, never in the
    shared pool's queue, so one container whose checks hang cannot delay anyone else's.
    """

    def __init__(self, workers: int = 8, per_group: int = PER_CONTAINER_CHECKS) -> None:
        self._heap: list[tuple[float, int, CheckRunner]] = []
        self._seq = 0
        self.per_group = per_group
        self._busy: dict[str, int] = {}  # group -> runs holding (or queued for) a worker
        self._waiting: dict[str, deque[tuple[float, CheckRunner]]] = {}  # due, over the share
        self._cond = threading.Condition()
        self._stopped = False
        self._pool = Workers(workers, "check")
        self._thread = threading.Thread(target=self._loop, name="check-timer", daemon=True)
        self._thread.start()

    def add(self, runner: CheckRunner, at: float | None = None) -> None:
        with self._cond:
            if self._stopped:
                return
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() if at is None else at, self._seq, runner))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._waiting.clear()
            self._cond.notify()
        self._pool.shutdown()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                due, _, runner = heapq.heappop(self._heap)
                if runner.stopped:
                    continue
                if self._busy.get(runner.group, 0) >= self.per_group:
                    log.debug("%s: waits, %d checks of %s running", runner.name,
                              self.per_group, runner.group[:12])
                    self._waiting.setdefault(runner.group, deque()).append((due, runner))
                    continue
                self._busy[runner.group] = self._busy.get(runner.group, 0) + 1
            try:
                self._pool.submit(self._run, runner, due)
            except RuntimeError:  # shut down (never a thread that cannot start: all are)
                return

    def _next_of(self, group: str) -> tuple[float, CheckRunner] | None:
        """A run of ``group`` ended: its next waiting runner takes over the slot (call locked)."""
        waiting = self._waiting.get(group)
        while waiting:
            due, runner = waiting.popleft()
            if not runner.stopped:
                return due, runner
        self._waiting.pop(group, None)
        self._busy[group] -= 1
        if not self._busy[group]:
            del self._busy[group]
        return None

    def _run(self, runner: CheckRunner, due: float) -> None:
        try:
            runner.run_once()
        except Exception:
            log.exception("%s: check runner error", runner.name)
        with self._cond:
            successor = None if self._stopped else self._next_of(runner.group)
        if successor is not None:
            try:
                self._pool.submit(self._run, successor[1], successor[0])
            except RuntimeError:  # shut down
                return
        if runner.stopped:
            return
        interval = max(runner.spec.interval, 0.01)
        next_at, now = due + interval, time.monotonic()
        if next_at <= now:  # overran: skip the missed ticks
            next_at += ((now - next_at) // interval + 1) * interval
        self.add(runner, next_at)
