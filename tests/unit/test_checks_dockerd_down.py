"""An ``exec`` check while dockerd cannot be reached records no result (agent/checks.py).

Before, any exception from the Docker API counted as a failed run: while dockerd restarted
(live-restore: the containers go on serving; a fleet-wide Docker upgrade) every exec-checked
instance of the host was deregistered after ``fall`` runs. A failure dockerd answers, a
non-zero exit and a timeout in the container still count.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import docker.errors
import pytest
import requests

from discovery.agent import checks
from discovery.agent.health import CheckRunner, CheckScheduler
from discovery.agent.spec import CheckResult, CheckSpec
from discovery.errors import DockerUnavailable
from tests.unit.test_checks import FakeAPI, FakeDocker, FakeStream, exec_check, target

REFUSED = requests.exceptions.ConnectionError("dockerd restarting (live-restore)")


def agents_check(api: FakeAPI, reach: checks.DockerReach) -> checks.ExecCheck:
    """An exec check of an agent whose checks share ``reach`` (one warning an outage)."""
    spec = CheckSpec(type="exec", timeout=1.0, params={"command": '["check", "--now"]'})
    return checks.ExecCheck(spec, replace(target(80, FakeDocker(api)), reach=reach))


@pytest.mark.parametrize("error", [REFUSED, ConnectionRefusedError(111, "refused"),
                                   DockerUnavailable("docker: not connected yet")])
def test_dockerd_unreachable_is_no_result(error: Exception) -> None:
    result = exec_check(FakeAPI(fail=error)).run()
    assert result.unknown and not result.ok
    assert result.output.startswith("no result: dockerd unreachable")


def test_a_healthy_instance_stays_healthy_through_a_dockerd_restart(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two exec-checked instances, fall 2, ten runs each while dockerd is away: no transition,
    no result counted; one warning for the outage (not one a run or a check), one line when
    dockerd answers again."""
    api = FakeAPI(fail=REFUSED)
    spec = CheckSpec(type="exec", rise=2, fall=2, params={"command": "true"})
    changes: list[bool] = []
    counted: list[bool] = []
    scheduler = CheckScheduler(workers=1)
    reach = checks.DockerReach()
    try:
        runners = [CheckRunner(spec, agents_check(api, reach), lambda ok, _r: changes.append(ok),
                               scheduler, healthy=True, on_result=counted.append)
                   for _ in range(2)]
        with caplog.at_level(logging.INFO, logger=checks.__name__):
            for _ in range(10):
                for runner in runners:
                    assert runner.run_once() is None
            assert all(r.healthy for r in runners) and changes == [] and counted == []
            assert caplog.text.count("dockerd unreachable") == 1
            api.fail = None  # back: exit 0
            for runner in runners:
                runner.run_once()
            assert caplog.text.count("dockerd answers again") == 1
            assert counted == [True, True] and changes == []
    finally:
        scheduler.stop()


def test_a_failure_dockerd_answers_still_counts() -> None:
    paused = docker.errors.APIError("409 Client Error: container is paused")
    result = exec_check(FakeAPI(fail=paused)).run()
    assert not result.ok and not result.unknown
    assert exec_check(FakeAPI(1)).run() == CheckResult(False, "exit 1")


class BrokenOnClose(FakeStream):
    """A hung command's stream that raises a connection error once the deadline closed it."""

    def __next__(self) -> bytes:
        if self.closed.is_set():
            raise requests.exceptions.ConnectionError("closed")
        return super().__next__()


def test_a_timeout_in_the_container_still_counts() -> None:
    """The deadline closes the stream: what that raises is no outage of dockerd's."""
    api = FakeAPI(hang=True)

    def start(exec_id: str, **_kw: object) -> FakeStream:
        api.stream = BrokenOnClose([], hang=True)
        return api.stream

    api.exec_start = start  # type: ignore[method-assign]
    result = exec_check(api, timeout=0.2).run()
    assert not result.ok and not result.unknown


def test_an_outage_past_its_bound_counts_as_failed_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """A dockerd that stays away (a failed upgrade) must not keep an app that died meanwhile
    registered for good: after UNKNOWN_MAX_S its runs count as failures, told once."""
    now = [1000.0]
    reach = checks.DockerReach(clock=lambda: now[0])
    check = agents_check(FakeAPI(fail=REFUSED), reach)
    with caplog.at_level(logging.WARNING, logger=checks.__name__):
        assert check.run().unknown
        now[0] += checks.UNKNOWN_MAX_S - 1
        assert check.run().unknown
        now[0] += 2
        late = [check.run(), check.run()]
    assert not any(r.unknown or r.ok for r in late)
    said = [r.getMessage() for r in caplog.records]
    assert sum("for over" in m for m in said) == 1, said
    reach.reached()  # back: a new outage gets its own bound
    assert check.run().unknown


@pytest.mark.parametrize("error", [requests.exceptions.SSLError("certificate expired"),
                                   requests.exceptions.ProxyError("proxy refused")])
def test_tls_and_proxy_errors_still_count(error: Exception) -> None:
    """A remote dockerd's expired client certificate is no restart: such runs fail."""
    result = exec_check(FakeAPI(fail=error)).run()
    assert not result.unknown and not result.ok


def test_an_answer_from_dockerd_ends_the_outage() -> None:
    """After an outage, runs that dockerd answered with an error (a paused container's 409)
    left its start in place: the next short outage counted as failed at once."""
    now = [1000.0]
    reach = checks.DockerReach(clock=lambda: now[0])
    assert agents_check(FakeAPI(fail=REFUSED), reach).run().unknown
    now[0] += 60
    paused = docker.errors.APIError("409 Client Error: container is paused")
    assert not agents_check(FakeAPI(fail=paused), reach).run().unknown  # dockerd answers
    now[0] += checks.UNKNOWN_MAX_S  # long after the first outage began
    assert agents_check(FakeAPI(fail=REFUSED), reach).run().unknown  # a new one: no result
