"""The agent's registry writes, queued (agent/wishes.py, agent/registrations.py), driven
directly: the newest wish of each key, written in order by a thread of its own; the
reconcile's fixes queued the same way; the history told in the order of the writes.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from discovery.agent.history import Cause
from discovery.agent.registrations import Registrations
from discovery.errors import RegistryUnavailable
from discovery.model import Instance, State
from discovery.registry import Snapshot
from tests.unit.test_agent_departure import Recorder, inst, registrations


def lost(*_args: Any) -> None:
    """A registry call no member answered."""
    raise RegistryUnavailable("no member answered within 5s")


def hang(rec: Recorder, key: tuple[str, str], fail: bool = False,
         ) -> tuple[threading.Event, threading.Event]:
    """``rec``'s first put of ``key`` waits for the first event returned (a member that does
    not answer), then is made (or, with ``fail``, gets no answer); the second event is set
    once it waits."""
    release, entered, put = threading.Event(), threading.Event(), rec.register

    def slow(instance: Instance) -> None:
        if instance.key == key and not entered.is_set():
            entered.set()
            assert release.wait(5)
            if fail:
                lost()
        put(instance)

    rec.register = slow  # type: ignore[method-assign]
    return release, entered


def behind_a_hung_write(regs: Registrations, rec: Recorder) -> tuple[Instance, threading.Event]:
    """a written; then z's write under way, hung until the event returned is set."""
    a, z = inst("a", 1), inst("z", 9)
    regs.write(a.key, a, Cause("check_passed"))
    release, entered = hang(rec, z.key)
    regs.want(z.key, z, Cause("check_passed"))
    assert entered.wait(5)
    return a, release


def causes(regs: Registrations, iid: str) -> list[str]:
    [history] = regs.history.query(iid)
    return [t["cause"] for t in history["transitions"]]


def test_pending_writes_at_a_revoking_stop_are_dropped_and_the_one_under_way_waited_for(
) -> None:
    regs, rec = registrations()
    a, b = inst("a", 1), inst("b", 2)
    release, entered = hang(rec, a.key)
    regs.want(a.key, a, Cause("check_passed"))
    assert entered.wait(5)  # under way
    regs.want(b.key, b, Cause("check_passed"))
    stopper = threading.Thread(target=regs.stop, kwargs={"revoke": True})
    stopper.start()
    stopper.join(0.2)  # an absence window: stop() waits for a's write
    assert stopper.is_alive()
    release.set()
    stopper.join(5)
    assert not stopper.is_alive() and regs.flush(0)
    assert [v.key for _, v in rec.writes] == [a.key] and set(regs.written) == {a.key}


def test_a_reconcile_leaves_a_key_whose_newer_wish_is_pending() -> None:
    """A wish made before the reconcile waits behind the write under way: the reconcile
    leaves that key to it (a, which the registry lost, is not put back up before the kill's
    drain and delete)."""
    regs, rec = registrations()
    a = inst("a", 1)
    regs.write(a.key, a, Cause("check_passed"))
    read_at = time.monotonic()
    with regs.turn():  # a write under way: the kill waits behind it, then the reconcile
        regs.want(a.key, None, Cause("kill"))
        regs.reconcile(Snapshot(), {a.key: a}, read_at)  # a's lease lost meanwhile
    assert regs.flush(5)
    assert [(k, v.state.value if k == "put" else v) for k, v in rec.writes] == [
        ("put", "up"), ("put", "draining"), ("delete", a.key)]
    assert a.key not in regs.written and causes(regs, a.key[1]) == ["check_passed", "kill"]


def test_a_decision_after_the_reconcile_wins_over_its_writes() -> None:
    """The lease was lost: the reconcile puts a and b back; while a's write hangs, b's
    container dies. b is not put back up (then drained): its departure replaces the
    reconcile's wish, and its history ends gone (the reconcile wrote it up, live for good)."""
    regs, rec = registrations()
    a, b = inst("a", 1), inst("b", 2)
    for i in (a, b):
        regs.write(i.key, i, Cause("check_passed"))
    release, entered = hang(rec, a.key)
    before = len(rec.writes)
    with regs.turn():
        regs.reconcile(Snapshot(), {a.key: a, b.key: b}, time.monotonic())
    assert entered.wait(5)  # a's write under way
    regs.want(b.key, None, departs=Cause("die"))  # the agent's decision, under its lock
    release.set()
    assert regs.flush(5)
    assert [(k, v.key if k == "put" else v, v.state.value if k == "put" else "")
            for k, v in rec.writes[before:]] == [
        ("put", a.key, "up"), ("put", b.key, "draining"), ("delete", b.key, "")]
    [history] = regs.history.query(b.key[1])
    assert not history["live"] and history["state"] == "gone", history


def test_a_key_whose_delete_failed_and_the_registry_lost_is_let_go() -> None:
    """Its delete failed (an outage), and the registry lost it since (the lease expired): a
    reconcile that finds it neither wanted nor registered lets it go (it was kept as written
    for good: counted as registered, adopted by a reload, and put back live in its history at
    the registry's return)."""
    regs, rec = registrations()
    a = inst("a", 1)
    regs.write(a.key, a, Cause("check_passed"))
    rec.deregister = lost  # type: ignore[method-assign,assignment]
    regs.want(a.key, None, departs=Cause("die"))
    assert regs.flush(5) and a.key in regs.written
    with regs.turn():
        regs.reconcile(Snapshot(), {}, time.monotonic())
    assert regs.written == {}
    regs.history.reconnected([a])  # not brought back
    assert not regs.history.query(a.key[1])[0]["live"]


def test_the_writer_goes_on_after_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    regs, rec = registrations()
    put = rec.register
    calls = []

    def once_broken(instance: Instance) -> None:
        calls.append(instance.key)
        if len(calls) == 1:
            raise ValueError("a bug")
        put(instance)

    rec.register = once_broken  # type: ignore[method-assign]
    a, b = inst("a", 1), inst("b", 2)
    regs.want(a.key, a, Cause("check_passed"))
    assert regs.flush(5)
    regs.want(b.key, b, Cause("check_passed"))
    assert regs.flush(5)
    assert calls == [a.key, b.key] and set(regs.written) == {b.key}
    assert regs.write_failed and "registry write for a/" in caplog.text  # the reconcile: a
    assert regs.unsure == {a.key}  # it may have landed: written again whatever is read


def test_a_pending_delete_of_an_adopted_instance_still_deletes_it() -> None:
    """An earlier run's instance (adopted) not wanted any more, its delete pending when the
    reconcile runs (at a restart, the writer busy with one write a key): it stays ours and is
    deleted (the reconcile let go of it, so the delete wrote nothing: up till the resync)."""
    regs, rec = registrations()
    k = inst("k", 2)
    regs.adopt = {k.key}
    read_at = time.monotonic()
    with regs.turn():  # a write under way
        regs.want(k.key, None, Cause("pause"))
        regs.reconcile(Snapshot({k.key: k}), {}, read_at)
    assert regs.flush(5) and ("delete", k.key) in rec.writes


@pytest.mark.parametrize("dies", [False, True])
def test_a_pending_wish_the_same_as_written_still_mends_a_lost_key(dies: bool) -> None:
    """The registry lost a key (lease expired) whose wish, the same as written (a Docker
    re-listing), is pending at the reconcile: it is written (skipped as unchanged before).
    If the container dies before that write, it is drained and deleted (the read may have
    missed it: a backend's re-put, an index gap; the delete found it not ours before)."""
    regs, rec = registrations()
    a = inst("a", 1)
    regs.write(a.key, a, Cause("check_passed"))
    read_at = time.monotonic()
    with regs.turn():
        regs.want(a.key, a, Cause("start"))
        regs.reconcile(Snapshot(), {a.key: a}, read_at)
        if dies:
            regs.want(a.key, None, departs=Cause("die"))
    assert regs.flush(5)
    assert [(k, v.state.value if k == "put" else "") for k, v in rec.writes[1:]] == (
        [("put", "draining"), ("delete", "")] if dies else [("put", "up")])


def test_a_forced_wish_replaced_by_the_same_instance_is_still_written() -> None:
    regs, rec = registrations()
    a, release = behind_a_hung_write(regs, rec)
    regs.want(a.key, a, Cause("reregistered"), force=True)  # the reconcile: the registry lost a
    regs.want(a.key, a, Cause("start"))  # then the same again, unforced
    release.set()
    assert regs.flush(5) and [v.key for _, v in rec.writes].count(a.key) == 2


def test_departures_dropped_after_a_lost_link_are_told() -> None:
    """The writes pending after a lost link are dropped (the reconcile redoes them), their
    departures told at once (a container that died then stayed live in its history)."""
    regs, rec = registrations()
    a, b = inst("a", 1), inst("b", 2)
    regs.write(b.key, None, Cause("check_failed"))  # b: known, never registered
    release, entered = hang(rec, a.key, fail=True)
    regs.want(a.key, a, Cause("check_passed"))
    assert entered.wait(5)  # a's write under way
    regs.want(b.key, None, departs=Cause("die", "exit code 1"))
    release.set()
    assert regs.flush(5)
    assert causes(regs, b.key[1])[-1] == "die" and not regs.history.query(b.key[1])[0]["live"]


def test_a_departure_replaced_by_the_containers_return_is_told_first() -> None:
    regs, rec = registrations()
    a, release = behind_a_hung_write(regs, rec)
    regs.want(a.key, None, departs=Cause("die", "exit code 137"))
    regs.want(a.key, None, Cause("start"))  # restarted (same container): not healthy yet
    release.set()
    assert regs.flush(5)
    assert causes(regs, a.key[1]) == ["check_passed", "die", "start"]


def test_a_write_landing_while_the_reconcile_reads_is_not_taken_for_lost() -> None:
    """Its time is kept once it returned: the read that began before it landed does not show
    it, and it is not written again as lost (two puts, a false 'reregistered')."""
    regs, rec = registrations()
    a = inst("a", 1)
    release, entered = hang(rec, a.key)
    regs.want(a.key, a, Cause("check_passed"))
    assert entered.wait(5)
    read_at = time.monotonic()  # the read begins; it does not show the put under way
    release.set()
    assert regs.flush(5)
    with regs.turn():
        regs.reconcile(Snapshot(), {a.key: a}, read_at)
    assert regs.flush(5)
    assert [k for k, _ in rec.writes] == ["put"] and "reregistered" not in causes(regs, a.key[1])


def test_an_adopted_instance_unwanted_then_wanted_then_unwanted_is_still_deleted() -> None:
    """An earlier run's instance: its check fails, passes, fails again, all behind a write
    under way; the earlier run's record is deleted (the last delete found it not ours)."""
    regs, rec = registrations()
    k = inst("k", 3)
    regs.adopt = {k.key}
    with regs.turn():
        for wish in (None, k, None):
            regs.want(k.key, wish, Cause("check_passed" if wish else "check_failed"))
    assert regs.flush(5) and rec.writes == [("delete", k.key)] and not regs.unsure


@pytest.mark.parametrize("landed", [True, False])
def test_a_write_whose_answer_was_lost_is_written_again(landed: bool) -> None:
    """The draining write's answer was lost (the member stopped: no answer within the
    timeout), and the reconcile its failure wakes reads. Written again in either case:
    - it landed all the same once the member ran again (the read shows it, as wanted): so
      that the backend's own record is it (left at ``up``, it put ``up`` back after the
      lease expired);
    - it did not, and the read began just before the failure returned: it is no newer than
      that read (taken for newer, it was skipped, the instance left ``up`` till the resync).
    Both seen in the SIGSTOP integration test (test_agent.py), about 1 run in 8."""
    regs, rec = registrations()
    a = inst("a", 1)
    draining = a.with_state(State.DRAINING)
    regs.write(a.key, a, Cause("check_passed"))
    put = rec.register
    rec.register = lost  # type: ignore[method-assign,assignment]
    read_at = time.monotonic()
    regs.want(a.key, draining, Cause("maintenance_on"))
    assert regs.flush(5) and a.key in regs.unsure
    rec.register = put  # type: ignore[method-assign]
    with regs.turn():
        regs.reconcile(Snapshot({a.key: draining if landed else a}), {a.key: draining},
                       read_at if not landed else time.monotonic())
    assert regs.flush(5) and [v.state for _, v in rec.writes] == [State.UP, State.DRAINING]
    assert not regs.unsure


def test_a_failed_write_keeps_the_time_of_the_write_before_it() -> None:
    """A reconcile's read begins (it will not show a); a's put lands, then its delete's
    draining put gets no answer. The reconcile does not take a as lost and forget it: the
    next one deletes it (a failure erased the put's time, and the dead container's ``up``
    record stayed till the resync)."""
    regs, rec = registrations()
    a = inst("a", 1)
    read_at = time.monotonic()
    regs.write(a.key, a, Cause("check_passed"))
    put = rec.register
    rec.register = lost  # type: ignore[method-assign,assignment]
    assert not regs.write(a.key, None, Cause("die"))
    with regs.turn():
        regs.reconcile(Snapshot(), {}, read_at)
    assert a.key in regs.written
    rec.register = put  # type: ignore[method-assign]
    with regs.turn():  # the next reconcile reads a: drained and deleted
        regs.reconcile(Snapshot({a.key: a}), {}, time.monotonic())
    assert regs.flush(5) and [(k, v.state if k == "put" else v) for k, v in rec.writes] == [
        ("put", State.UP), ("put", State.DRAINING), ("delete", a.key)]


def lost_after(seconds: float) -> Any:
    """A registry call no member answered within ``seconds``."""
    def call(*_args: Any) -> None:
        time.sleep(seconds)
        lost()
    return call


def test_each_lost_write_gets_its_own_recheck_and_one_that_cannot_read_stays_owed() -> None:
    """a's put waited 0.4 s and b's draining put 0.05 s, both unanswered; each instance then
    deleted. Each lost write is looked for again twice its wait after that delete (±10 %):
    b's recheck, sooner, does not replace a's. A recheck whose reconcile cannot read is
    still owed (:meth:`Registrations.unread`)."""
    regs, rec = registrations()
    a, b = inst("a", 1), inst("b", 2)
    regs.write(b.key, b)
    put = rec.register
    rec.register = lost_after(0.4)  # type: ignore[method-assign]
    assert not regs.write(a.key, a)
    rec.register = lost_after(0.05)  # type: ignore[method-assign]
    assert not regs.write(b.key, None)  # its draining put
    assert regs.take_failed() and regs.retry_due() == math.inf  # no recheck before a write
    rec.register = put  # type: ignore[method-assign]
    waited = {k[0]: regs._late[k] for k in (a.key, b.key)}  # 0.4 s, 0.05 s, or more if slow
    t = time.monotonic()
    assert regs.write(a.key, None) and regs.write(b.key, None)
    sooner = regs.retry_due() - t  # b's: 2 x its wait (±10 %), from its delete
    assert 1.8 * waited["b"] <= sooner <= 2.2 * waited["b"] + 0.05 < 1.8 * waited["a"], sooner
    deadline = time.monotonic() + 2
    while not regs.owed():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert regs.take_failed() and not regs.owed()  # b's taken by the reconcile about to run
    later = regs.retry_due() - t  # a's still there
    assert 1.8 * waited["a"] <= later <= 2.2 * waited["a"] + 0.05, later
    regs.unread(down=False)  # that reconcile could not read: owed at the retry's turn
    assert regs.write_failed and regs.retry_due() <= time.monotonic() + 0.5


def test_a_wake_that_tells_of_a_recheck_is_no_reconcile_but_a_docker_listing_is() -> None:
    """The run loop, woken to learn of a sooner recheck, waits on (``waits``: True) rather
    than reconciling at once; a Docker listing's wake at the same moment still reconciles."""
    regs, _ = registrations()
    due = time.monotonic() + 60  # the resync
    regs._recheck_after(inst("a", 1).key, 1.0)
    assert regs.waits(due) and regs.retry_due() < due
    assert not regs.waits(due)  # woken again, for something else: a reconcile
    regs._recheck_after(inst("b", 2).key, 0.5)
    regs.reconcile_soon()
    assert not regs.waits(due)
    regs._recheck_after(inst("c", 3).key, 5.0)  # later than the next: no wake needed
    assert not regs._moved
