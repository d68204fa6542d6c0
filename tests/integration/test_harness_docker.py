"""The dockerd harness against the real daemon: image build + cache, the example app on
loopback, docker healthchecks, cleanup, and a dockerd restart."""

from __future__ import annotations

import time
from functools import partial

import docker
import docker.errors
import pytest

from tests.harness.docker_daemon import dockerd_pid, restart_dockerd
from tests.harness.dockerd import (
    EXAMPLE_IMAGE_TAG,
    IMAGE_HASH_LABEL,
    SESSION_ID,
    TEST_LABEL,
    ContainerFactory,
    app_healthcheck,
    app_port,
    build_example_image,
    cleanup_session_containers,
    example_image_hash,
    health_status,
    run_app,
    set_app_healthy,
)
from tests.harness.haproxy import http_get
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration


def _gone(client: docker.DockerClient, cid: str) -> bool:
    try:
        client.containers.get(cid)
    except docker.errors.NotFound:
        return True
    return False


def test_image_builds_and_second_build_is_cached(
    docker_client: docker.DockerClient, example_image: str
) -> None:
    assert example_image == EXAMPLE_IMAGE_TAG
    image = docker_client.images.get(example_image)
    assert image.labels[IMAGE_HASH_LABEL] == example_image_hash()

    t0 = time.monotonic()
    assert build_example_image(docker_client) == example_image
    cached = time.monotonic() - t0
    assert cached < 1.0, f"cache hit took {cached:.2f}s"
    assert docker_client.images.get(example_image).id == image.id

    # The real build path, under a throw-away tag (layers come from the build cache).
    tag = f"discovery-example-app:harness-{SESSION_ID}"
    try:
        assert build_example_image(docker_client, tag, force=True) == tag
        built = docker_client.images.get(tag)
        assert built.labels[IMAGE_HASH_LABEL] == example_image_hash()
        assert built.attrs["Config"]["Entrypoint"] == ["/bin/sh", "/serve.sh"]
    finally:
        docker_client.images.remove(tag)


def test_app_serves_its_name_on_loopback(containers: ContainerFactory) -> None:
    ports = [free_port(), free_port()]  # distinct: free_port never repeats one
    started = [
        containers(name=f"harness-web-{SESSION_ID}-{i}", port=p, labels={"smartstack.test": "x"})
        for i, p in enumerate(ports)
    ]
    for c, p in zip(started, ports, strict=True):
        status, body = wait_for(partial(http_get, p), timeout=15, message=f"app on :{p}")
        assert (status, body) == (200, c.name)
        assert http_get(p, "/health") == (200, "ok")
        assert app_port(c) == p
        assert c.attrs["HostConfig"]["NetworkMode"] == "host"
        assert c.attrs["Config"]["ExposedPorts"] == {f"{p}/tcp": {}}
        assert c.labels["smartstack.test"] == "x"
        assert c.labels[TEST_LABEL] == SESSION_ID
        # The only other labels are inherited from the image.
        assert set(c.labels) == {"smartstack.test", TEST_LABEL, IMAGE_HASH_LABEL}
        # The agent rejects unknown "discovery.*" keys: the harness must add none.
        assert not any(k.startswith("discovery.") for k in c.labels)


def test_expose_false_has_no_exposed_ports(containers: ContainerFactory) -> None:
    c = containers(name=f"harness-noexpose-{SESSION_ID}", expose=False)
    assert not c.attrs["Config"].get("ExposedPorts")
    wait_for(lambda: http_get(app_port(c))[0] == 200, timeout=15, message="app up")


def test_healthy_0_gives_404_on_health(containers: ContainerFactory) -> None:
    c = containers(name=f"harness-sick-{SESSION_ID}", env={"HEALTHY": "0"})
    port = app_port(c)
    wait_for(lambda: http_get(port)[0] == 200, timeout=15, message="app up")
    assert http_get(port, "/health")[0] == 404
    set_app_healthy(c, True)
    assert http_get(port, "/health") == (200, "ok")
    set_app_healthy(c, False)
    assert http_get(port, "/health")[0] == 404


def test_docker_healthcheck_healthy_and_unhealthy(containers: ContainerFactory) -> None:
    hc = app_healthcheck(interval=0.2, timeout=1.0, retries=2, start_period=0.1)
    good = containers(name=f"harness-hc-good-{SESSION_ID}", healthcheck=hc)
    bad = containers(name=f"harness-hc-bad-{SESSION_ID}", healthcheck=hc, env={"HEALTHY": "0"})
    assert good.attrs["Config"]["Healthcheck"]["Interval"] == 200_000_000
    wait_for(lambda: health_status(good) == "healthy", timeout=20, message="good healthy")
    wait_for(lambda: health_status(bad) == "unhealthy", timeout=20, message="bad unhealthy")

    # And at runtime, both ways.
    set_app_healthy(good, False)
    wait_for(lambda: health_status(good) == "unhealthy", timeout=20, message="good->unhealthy")
    set_app_healthy(bad, True)
    wait_for(lambda: health_status(bad) == "healthy", timeout=20, message="bad->healthy")


def test_no_healthcheck_means_no_health_state(containers: ContainerFactory) -> None:
    c = containers(name=f"harness-nohc-{SESSION_ID}")
    assert health_status(c) is None


def test_stop_is_fast(containers: ContainerFactory) -> None:
    c = containers(name=f"harness-stop-{SESSION_ID}")
    wait_for(lambda: http_get(app_port(c))[0] == 200, timeout=15, message="app up")
    t0 = time.monotonic()
    c.stop(timeout=10)
    assert time.monotonic() - t0 < 5, "serve.sh should forward SIGTERM to httpd"
    c.reload()
    assert c.status == "exited"
    assert c.attrs["State"]["ExitCode"] == 0


def test_factory_cleanup_removes_its_containers(
    docker_client: docker.DockerClient, example_image: str
) -> None:
    factory = ContainerFactory(docker_client, example_image)
    a = factory(name=f"harness-clean-a-{SESSION_ID}")
    b = factory(name=f"harness-clean-b-{SESSION_ID}")
    b.stop(timeout=1)
    factory.close()
    assert _gone(docker_client, str(a.id)) and _gone(docker_client, str(b.id))
    factory.close()  # idempotent


def test_cleanup_session_containers_removes_only_this_session(
    docker_client: docker.DockerClient, example_image: str
) -> None:
    ours = run_app(docker_client, name=f"harness-sess-{SESSION_ID}", port=free_port())
    other = docker_client.api.create_container(
        example_image,
        name=f"harness-other-{SESSION_ID}",
        labels={TEST_LABEL: "someone-else"},
        host_config=docker_client.api.create_host_config(network_mode="host"),
    )["Id"]
    try:
        removed = cleanup_session_containers(docker_client)
        assert str(ours.id) in removed
        assert other not in removed
        assert _gone(docker_client, str(ours.id))
        assert not _gone(docker_client, other)
    finally:
        docker_client.api.remove_container(other, force=True)


def test_name_clash_with_dead_session_leftover_is_resolved(
    docker_client: docker.DockerClient, containers: ContainerFactory
) -> None:
    name = f"harness-clash-{SESSION_ID}"
    # pid 999999999 is above any pid_max: that session is certainly dead.
    stale = docker_client.api.create_container(
        EXAMPLE_IMAGE_TAG,
        name=name,
        labels={TEST_LABEL: "999999999-deadbeef"},
        host_config=docker_client.api.create_host_config(network_mode="host"),
    )["Id"]
    try:
        c = containers(name=name)
        assert c.id != stale and _gone(docker_client, stale)
        # A clash with a live container (ours) is an error, not a removal.
        with pytest.raises(docker.errors.APIError) as info:
            containers(name=name)
        assert info.value.status_code == 409
        assert not _gone(docker_client, str(c.id))
    finally:
        if not _gone(docker_client, stale):
            docker_client.api.remove_container(stale, force=True)


@pytest.mark.slow
def test_restart_dockerd(docker_client: docker.DockerClient, containers: ContainerFactory) -> None:
    """Runs last in this module: restarts the shared dockerd (~ a few seconds)."""
    plain = containers(name=f"harness-rs-plain-{SESSION_ID}")
    always = containers(name=f"harness-rs-always-{SESSION_ID}", restart_policy={"Name": "always"})
    for c in (plain, always):
        wait_for(partial(http_get, app_port(c)), timeout=15, message=f"{c.name} up")
    old = dockerd_pid()

    new = restart_dockerd(timeout=90)

    assert old is not None and new != old
    assert docker_client.ping()  # the session client survives the restart
    plain.reload()
    assert plain.status == "exited"
    assert plain.labels[TEST_LABEL] == SESSION_ID
    wait_for(
        lambda: http_get(app_port(always))[0] == 200,
        timeout=30,
        message="restart-policy=always container back after the dockerd restart",
    )
    always.reload()
    assert always.status == "running"
