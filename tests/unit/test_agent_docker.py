"""The agent's side of Docker (agent/core.py): the container list, its events, SIGHUP reloads.

Driven with a fake Docker (what :class:`DockerSource` hands the agent) and a fake registry
that records every write; checks are ``none`` (healthy at their first run).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from discovery.agent import core, tracked
from discovery.agent.config import AgentConfig
from discovery.agent.docker_source import DockerSource
from discovery.agent.spec import CheckSpec, CheckTarget
from discovery.agent.tracked import iso_ns
from discovery.errors import DockerUnavailable
from discovery.model import Instance
from discovery.registry import RegistryURL, Snapshot
from discovery.registry.reads import ReadStats
from tests.unit.test_labels import container

STARTED = "2024-01-01T00:00:05.500000000Z"


class FakeDocker:
    """The running containers (id -> inspect data); ``fail`` makes the next list raise."""

    def __init__(self, *_args: Any) -> None:
        self.running: dict[str, dict[str, Any]] = {}
        self.fail: Exception | None = None
        self.during_list: Callable[[], None] = lambda: None  # runs while Docker is listed
        self.client = None
        self.connected = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check_target(self, address: str, port: int, container_id: str) -> CheckTarget:
        return CheckTarget(address, port, container_id, self.client)

    def inspect(self, cid: str) -> dict[str, Any] | None:  # (by a prefix too, as Docker)
        return copy.deepcopy(next((a for k, a in self.running.items() if cid and k.startswith(cid)),
                                  None))

    def list_running(self) -> list[dict[str, Any]]:
        if self.fail is not None:
            raise self.fail
        listed = [copy.deepcopy(a) for a in self.running.values()]
        self.during_list()
        return listed


class FakeRegistry:
    url = RegistryURL.parse("etcd://127.0.0.1:1/p")
    invalid_records = 0

    def __init__(self) -> None:
        self.reads = ReadStats()
        self.data: dict[tuple[str, str], Instance] = {}
        self.log: list[tuple[Any, ...]] = []

    def add_state_listener(self, _callback: Any) -> None:
        pass

    def node_snapshot(self, node: str) -> Snapshot:
        return Snapshot({k: v for k, v in self.data.items() if v.node == node})

    def register(self, inst: Instance) -> None:
        self.log.append(("put", inst.key, inst.state.value))
        self.data[inst.key] = inst

    def deregister(self, service: str, iid: str) -> None:
        self.log.append(("delete", (service, iid)))
        self.data.pop((service, iid), None)


class Setup:
    def __init__(self, agent: core.Agent, registry: FakeRegistry) -> None:
        self.agent, self.registry = agent, registry
        docker = agent.docker
        assert isinstance(docker, FakeDocker)
        self.docker = docker

    def run(self, cid: str, service: str, labels: dict[str, str] | None = None,
            started: str = STARTED) -> dict[str, Any]:
        """A container running in Docker (not yet told to the agent)."""
        attrs = container({"discovery.service": service, **(labels or {})})
        attrs.update(Id=cid * 64, Name=f"/{service}-1",
                     State={"Running": True, "StartedAt": started})
        self.docker.running[attrs["Id"]] = attrs
        return attrs

    def services(self) -> list[str]:
        """The services registered once the agent's pending writes are done."""
        assert self.agent.registrations.flush(5)
        return sorted(key[0] for key in self.registry.data)

    def wait_services(self, want: list[str], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.services() != want:
            assert time.monotonic() < deadline, f"registered {self.services()}, not {want}"
            time.sleep(0.01)

    def event(self, action: str, attrs: dict[str, Any], ns: int | None = None,
              flush: bool = True, **extra: str) -> None:
        """Docker's event ``action`` of the container ``attrs``, handled; with ``flush``, the
        writes it decided are done too (made by a thread of their own)."""
        event: dict[str, Any] = {"Action": action, "id": attrs["Id"],
                                 "Actor": {"ID": attrs["Id"], "Attributes": extra}}
        if ns is not None:
            event["timeNano"] = ns
        self.agent._on_event(event)
        assert not flush or self.agent.registrations.flush(5)


@contextlib.contextmanager
def agent_on(monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry,
             check: CheckSpec | None = None) -> Iterator[Setup]:
    """An agent of node n1 on ``registry`` and a :class:`FakeDocker` (its checks ``check``,
    by default ``none``), its checks stopped afterwards."""
    monkeypatch.setattr(core, "DockerSource", FakeDocker)
    config = AgentConfig(registry=str(registry.url), node="n1", resync=3600,
                         check=check or CheckSpec(type="none"))
    agent = core.Agent(config, registry)  # type: ignore[arg-type]
    yield Setup(agent, registry)
    agent.stop()
    with agent._lock:
        for tracked in agent._tracked.values():
            tracked.stop_runners()
    agent._checks.stop()


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    with agent_on(monkeypatch, FakeRegistry()) as made:
        yield made


def later(attrs: dict[str, Any], seconds: float = 1.0) -> int:
    """timeNano of an event ``seconds`` after the container started."""
    return iso_ns(attrs["State"]["StartedAt"]) + int(seconds * 1e9)


# ---- labels: one bad container is skipped, the others are registered ---------------------

@pytest.mark.parametrize("label", ["discovery.meta.service", "discovery.check.service",
                                   "discovery.80.meta.service", "SERVICE_SERVICE"])
def test_a_label_ending_in_service_neither_names_a_service_nor_stops_the_list(
        setup: Setup, label: str) -> None:
    setup.run("a", "alpha")
    setup.run("b", "beta", {label: "evil"})
    setup.run("c", "gamma")
    setup.agent._on_sync(list(setup.docker.running.values()))
    assert setup.agent._synced
    setup.wait_services(["alpha", "beta", "gamma"])


def test_a_container_whose_record_is_refused_is_skipped_and_the_list_goes_on(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """Labels fine, but what Docker says of it makes no record (a name over 512 characters):
    one error naming it; the containers after it are still listed, the listing done."""
    setup.run("a", "alpha")
    long = setup.run("b", "beta")
    long["Name"] = "/" + "b" * 600
    setup.run("c", "gamma")
    setup.agent._on_sync(list(setup.docker.running.values()))
    assert setup.agent._synced and list(setup.agent._bad_labels) == [long["Id"]]
    setup.wait_services(["alpha", "gamma"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "container_name" in errors[0] and "b" * 12 in errors[0]


def test_a_default_docker_check_names_a_container_without_a_healthcheck(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """[agent.check] type = "docker": a container with no HEALTHCHECK and no check label had no
    check runner, never became healthy and was never registered, with no word."""
    with agent_on(monkeypatch, FakeRegistry(), CheckSpec(type="docker")) as setup:
        bare = setup.run("a", "alpha")
        setup.agent._on_sync(list(setup.docker.running.values()))
        assert list(setup.agent._bad_labels) == [bare["Id"]]
        assert any("no HEALTHCHECK" in r.getMessage() for r in caplog.records
                   if r.levelname == "ERROR")


def test_a_destroyed_containers_label_error_is_not_kept(setup: Setup) -> None:
    """A container with bad labels is logged once (its error kept while it may come back); a
    destroyed one never does: its error is dropped (it was kept for good, one a container)."""
    bad = setup.run("b", "beta", {"discovery.port": "not-a-port"})
    setup.agent._on_sync(list(setup.docker.running.values()))
    assert list(setup.agent._bad_labels) == [bad["Id"]]
    setup.event("die", bad, later(bad), exitCode="1")
    assert list(setup.agent._bad_labels) == [bad["Id"]]  # may start again: logged once still
    setup.event("destroy", bad, later(bad, 2.0))
    assert setup.agent._bad_labels == {}


def test_a_label_error_of_a_container_no_listing_shows_is_not_kept(setup: Setup) -> None:
    """Its destroy missed (Docker's events replayed only so far back): a listing that does not
    show it drops its error (kept for good before); one that still runs keeps its own."""
    bad = setup.run("b", "beta", {"discovery.port": "not-a-port"})
    worse = setup.run("c", "gamma", {"discovery.port": "nor-this"})
    setup.agent._on_sync(list(setup.docker.running.values()))
    assert set(setup.agent._bad_labels) == {bad["Id"], worse["Id"]}
    del setup.docker.running[bad["Id"]]
    setup.agent._on_sync(list(setup.docker.running.values()))
    assert list(setup.agent._bad_labels) == [worse["Id"]]


# ---- SIGHUP reload ----------------------------------------------------------------------

def test_a_reload_whose_listing_fails_keeps_the_old_state(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.run("a", "alpha")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["alpha"])
    old = setup.agent.config
    setup.docker.fail = DockerUnavailable("docker inspect aaaa: read timed out")
    setup.agent._reload(replace(old, zone="z1"))
    assert setup.agent.config is old and len(setup.agent._tracked) == 1
    assert [r.levelname for r in caplog.records if "reload" in r.getMessage()] == ["ERROR"]
    assert setup.agent._pending_config is not None  # tried again by the run loop
    setup.docker.fail = None
    assert setup.agent.reconcile()
    assert setup.services() == ["alpha"] and setup.registry.log[-1][0] == "put"
    setup.agent._reload(setup.agent._pending_config)
    assert setup.agent.config.zone == "z1"


def test_docker_list_errors_are_docker_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    class Api:
        def containers(self) -> list[dict[str, Any]]:
            raise requests.exceptions.ConnectionError("dockerd restarting")

    class Client:
        api = Api()

    source = DockerSource(None, lambda _e: None, lambda _l: None)
    with pytest.raises(DockerUnavailable, match="not connected yet"):
        source.list_running()  # before the event loop connected
    source._client = Client()  # type: ignore[assignment]
    with pytest.raises(DockerUnavailable, match="dockerd restarting"):
        source.list_running()


def test_a_dockerd_down_at_start_is_waited_for(tmp_path: Path) -> None:
    """Built without dockerd (the agent started before it): no error, the event loop
    connects when it comes (it raised DockerException, a traceback for `agent` and `up`)."""
    source = DockerSource(f"unix://{tmp_path}/no-dockerd.sock", lambda _e: None,
                          lambda _l: None)
    assert not source.connected
    with pytest.raises(DockerUnavailable):
        source.inspect("abc")


def test_a_container_that_dies_while_a_reload_lists_docker_stays_gone(setup: Setup) -> None:
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])

    def dies() -> None:  # listed as running, then it dies; the event thread tells the agent
        setup.docker.running.clear()
        told = threading.Thread(target=setup.event, args=("die", x, later(x)))
        told.start()
        told.join(5)
        assert not told.is_alive()

    setup.docker.during_list = dies
    setup.agent._reload(setup.agent.config)
    assert setup.agent._tracked == {}
    assert setup.agent.reconcile()
    assert setup.services() == []


def test_a_container_started_while_a_reload_lists_docker_is_kept(setup: Setup) -> None:
    def starts() -> None:
        y = setup.run("y", "ysvc")
        told = threading.Thread(target=setup.event, args=("start", y))
        told.start()
        told.join(5)
        assert not told.is_alive()

    setup.docker.during_list = starts
    setup.agent._reload(setup.agent.config)
    assert list(setup.agent._tracked) == ["y" * 64]
    setup.wait_services(["ysvc"])


def test_a_container_a_reload_refuses_is_deregistered_at_once(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """The new settings refuse it (here a default docker check, and it has no HEALTHCHECK): its
    instance is taken out with the reload, as when its labels change. It stayed registered,
    untracked, until the next reconcile (after a fleet's SIGHUP: up to a resync period)."""
    setup.run("a", "alpha")
    setup.run("b", "beta")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["alpha", "beta"])
    beta = setup.docker.running["b" * 64]
    beta["Config"]["Healthcheck"] = {"Test": ["CMD", "true"]}
    beta["State"]["Health"] = {"Status": "healthy"}
    assert setup.agent._reload(replace(setup.agent.config, check=CheckSpec(type="docker")))
    assert list(setup.agent._tracked) == ["b" * 64]
    assert setup.services() == ["beta"]  # (flushed: no reconcile)
    assert "no HEALTHCHECK" in caplog.text


def test_a_reload_keeps_the_node_name(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.run("a", "alpha")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["alpha"])
    old = setup.agent.config
    setup.agent._reload(replace(old, node="n2", zone="z1", ttl=30.0, state_dir="/elsewhere",
                                registry="etcd://u:s3cret@127.0.0.1:2/q"))
    # the zone is applied; what is made once is kept, each named, never a value (a password)
    assert (setup.agent.config.node, setup.agent.config.zone) == ("n1", "z1")
    assert (setup.agent.config.ttl, setup.agent.config.state_dir,
            setup.agent.config.registry) == (old.ttl, old.state_dir, old.registry)
    assert ("node, registry, ttl, state_dir changed, ignored: restart the agent to change them"
            in caplog.text) and "s3cret" not in caplog.text
    setup.wait_services(["alpha"])
    written = len(setup.registry.log)
    assert setup.agent.reconcile() and setup.agent.reconcile()
    assert len(setup.registry.log) == written  # nothing rewritten
    assert {i.node for i in setup.registry.data.values()} == {"n1"}


# ---- events -------------------------------------------------------------------------------

def kill_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kill-")]


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(core, "KILL_GRACE", 0.3)
    monkeypatch.setattr(tracked, "KILL_GRACE", 0.3)  # kill_grace()'s floor
    return 0.3


def test_a_container_that_survives_its_kill_signal_is_registered_again(
        setup: Setup, short_grace: float) -> None:
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    written = len(setup.registry.log)
    setup.event("kill", x, later(x), signal="15")  # a program that handles SIGTERM, lives on
    key = ("xsvc", "n1:" + "x" * 12 + ":80")
    assert setup.registry.log[written:] == [("put", key, "draining"), ("delete", key)]
    setup.wait_services(["xsvc"])  # still running after the grace: its check decides


def test_a_renamed_container_is_written_again_not_replaced(setup: Setup) -> None:
    """docker rename: the record follows it at once (one put of the new name), never drained,
    deleted and checked again, neither at its event nor at a listing (a Docker reconnect),
    which took it for a new container before."""
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    key = ("xsvc", "n1:" + "x" * 12 + ":80")
    written = len(setup.registry.log)
    x["Name"] = "/xsvc-renamed"
    setup.event("rename", x, later(x), name="xsvc-renamed", oldName="/xsvc-1")
    assert setup.registry.log[written:] == [("put", key, "up")]
    assert setup.registry.data[key].container_name == "xsvc-renamed"
    x["Name"] = "/xsvc-again"
    setup.agent._on_sync(list(setup.docker.running.values()))  # a listing finds it renamed
    assert setup.agent.registrations.flush(5)
    assert setup.registry.log[written + 1:] == [("put", key, "up")]
    assert setup.registry.data[key].container_name == "xsvc-again"


def test_a_slow_inspect_does_not_hold_the_agents_lock(setup: Setup) -> None:
    """Docker asked about a started container (up to the client's 10 s when dockerd is slow)
    while the agent's lock is free: every other container's check transitions take it."""
    setup.run("a", "alpha")
    b = setup.run("b", "beta")
    setup.agent._on_sync([setup.docker.running[next(iter(setup.docker.running))]])
    asked, answer = threading.Event(), threading.Event()
    inspect = setup.docker.inspect

    def slow(cid: str) -> dict[str, Any] | None:
        asked.set()
        assert answer.wait(5)
        return inspect(cid)

    setup.docker.inspect = slow  # type: ignore[method-assign]
    event = threading.Thread(target=setup.event, args=("start", b), daemon=True)
    event.start()
    try:
        assert asked.wait(5)
        assert setup.agent._lock.acquire(timeout=1)  # free while Docker is asked
        setup.agent._lock.release()
    finally:
        answer.set()
        event.join(5)
    setup.wait_services(["alpha", "beta"])


def test_a_killed_container_that_dies_is_not_registered_again(
        setup: Setup, short_grace: float) -> None:
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    setup.event("kill", x, later(x), signal="15")
    assert setup.services() == []
    setup.event("die", x, later(x, 2), exitCode="0")
    del setup.docker.running[x["Id"]]
    deadline = time.monotonic() + 5
    while kill_threads():  # the grace has passed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert setup.services() == [] and setup.agent._tracked == {}


def test_a_killed_containers_thread_ends_once_it_died_not_at_the_grace(setup: Setup) -> None:
    """The grace is 60 s; the container dies at once: its thread goes within a second (it
    stayed the minute: the registration bench counted 60 more threads after 60 kills)."""
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    setup.event("kill", x, later(x), signal="15")
    assert len(kill_threads()) == 1
    setup.event("die", x, later(x, 2), exitCode="0")
    deadline = time.monotonic() + 2.0  # looked at each second
    while kill_threads():
        assert time.monotonic() < deadline, "the kill's thread waits out its grace"
        time.sleep(0.01)


@pytest.mark.parametrize("action", ["kill", "die", "stop", "destroy"])
def test_replayed_events_of_an_earlier_run_are_ignored(setup: Setup, action: str) -> None:
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    written = len(setup.registry.log)
    # the same second as this run's start, before it: replayed by events(since=...)
    setup.event(action, x, later(x, -0.3), signal="15", exitCode="0")
    assert setup.registry.log[written:] == []
    setup.event(action, x, later(x), signal="15", exitCode="0")  # this run's: drains
    assert setup.services() == []


def test_a_die_without_a_time_is_not_taken_for_a_replay(setup: Setup) -> None:
    x = setup.run("x", "xsvc")
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["xsvc"])
    setup.event("die", x, exitCode="0")
    assert setup.services() == [] and setup.agent._tracked == {}


def test_a_grace_already_over_still_tells_the_agent_stopped() -> None:
    stop, end = threading.Event(), time.monotonic()  # killed KILL_GRACE ago, a grace of 0 s
    kill = {"c": (end, None)}
    assert not tracked.wait_grace(stop, kill, "c", end, 0.0)
    stop.set()
    assert tracked.wait_grace(stop, kill, "c", end, 0.0)  # stopped: no refresh then


def test_the_kill_grace_covers_the_containers_own_stop_timeout() -> None:
    assert tracked.kill_grace(None) == tracked.KILL_GRACE
    assert tracked.kill_grace({"Config": {"StopTimeout": 10}}) == tracked.KILL_GRACE
    assert tracked.kill_grace({"Config": {"StopTimeout": 120}}) == 125.0


def test_replayed_events_a_listing_shows_are_not_handed_on() -> None:
    """After a reconnect Docker replays the events since the last one seen, and the agent gets
    a listing made after them: a pause and unpause (or an unhealthy and healthy) of the outage
    replayed took the container out of the registry and back in, fleet-wide a flap. A kill is
    handed on (a container draining on SIGTERM still runs when listed), as is what came after
    the listing, by dockerd's clock (here an hour behind ours: a remote dockerd's)."""
    now = time.time_ns() - 3600 * 10**9
    replayed = [{"Action": a, "id": "c1", "time": now // 10**9 - 5, "timeNano": now - d}
                for a, d in (("pause", 4 * 10**9), ("unpause", 3 * 10**9),
                             ("health_status: unhealthy", 2 * 10**9), ("kill", 10**9))]
    fresh = {"Action": "pause", "id": "c1", "time": now // 10**9 + 1, "timeNano": now + 10**9}

    class Api:
        def events(self, **_kwargs: Any) -> Iterator[dict[str, Any]]:
            return iter([*replayed, fresh])

        def containers(self) -> list[dict[str, Any]]:
            return []

        def info(self) -> dict[str, Any]:  # as Go writes it: nanoseconds, a local offset
            at = datetime.fromtimestamp(now / 1e9, UTC).astimezone(timezone(timedelta(hours=2)))
            return {"SystemTime": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123+02:00"}

    handed: list[str] = []
    source = DockerSource(None, lambda e: handed.append(e["Action"]), lambda _l: None)
    source._connect = lambda: type("Client", (), {"api": Api()})()  # type: ignore[method-assign]
    with pytest.raises(DockerUnavailable, match="stream closed"):
        source._session()
    assert handed == ["kill", "pause"]


def test_a_dockerd_that_does_not_tell_its_clock_is_compared_with_ours(
        caplog: pytest.LogCaptureFixture) -> None:
    """info() failing (a flaky dockerd): the replayed events are still left out, by our clock
    (a local dockerd's), with one warning; it turned the filter off without a word."""
    now = time.time_ns()
    replayed = {"Action": "pause", "id": "c1", "time": now // 10**9 - 5,
                "timeNano": now - 5 * 10**9}

    class Api:
        def events(self, **_kwargs: Any) -> Iterator[dict[str, Any]]:
            return iter([replayed])

        def containers(self) -> list[dict[str, Any]]:
            return []

        def info(self) -> dict[str, Any]:
            raise requests.exceptions.ReadTimeout("read timed out")

    handed: list[str] = []
    source = DockerSource(None, lambda e: handed.append(e["Action"]), lambda _l: None)
    source._connect = lambda: type("Client", (), {"api": Api()})()  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(DockerUnavailable, match="stream closed"):
            source._session()
    assert handed == []
    assert sum("its clock not told" in r.getMessage() for r in caplog.records) == 1
