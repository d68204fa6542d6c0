"""The sidecar image, built here with no image registry, doing its job against real servers.

The image is built like docs/deployment.md says (tests/harness/image.py): a base made by
``debootstrap --variant=minbase bookworm`` + ``docker import`` (cached by tag: the minute of
debootstrap runs once per machine), wheels prepared on the host, ``docker build --network none``.
Then, with ``--network host`` and the Docker socket mounted read-only:

* ``discovery up`` in one container (etcd): a labelled app container gets registered, requests
  through the container's HAProxy reach it, Docker's HEALTHCHECK of the image turns healthy,
  the process runs as a non-root user, and ``docker stop`` deregisters everything (exit 0);
* ``discovery agent`` and ``discovery watch`` as two containers of the same image (ZooKeeper),
  configured from the environment and a mounted TOML file;
* without the socket's group the entrypoint refuses at once and names the fix;
* docker-compose.yml is valid (``docker-compose config``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container

from tests.harness.agent import service_instances, wait_gone, wait_registered
from tests.harness.dockerd import app_healthcheck, health_status, remove_containers
from tests.harness.image import (
    BUILD_TIMES,
    DOCKER_SOCKET,
    build_sidecar_image,
    container_logs,
    docker_socket_gid,
    run_sidecar,
)
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread

REPO_ROOT = Path(__file__).resolve().parents[2]


def app_labels(service: str) -> dict[str, str]:
    return {
        "discovery.service": service,
        "discovery.check": "http",
        "discovery.check.path": "/health",
        "discovery.check.interval": "500ms",
    }


def unique_service() -> str:
    """A service name of this test alone: the sidecar's agent registers every labelled
    container of the host, and other tests (or other sessions) may run a "web" now."""
    return f"img-{uuid.uuid4().hex[:8]}"

# A cold first build (one debootstrap) happens inside the first test's fixture setup.
IMAGE_TIMEOUT = 900


_build_error: list[BaseException] = []


@pytest.fixture(scope="module")
def sidecar_image(docker_client: docker.DockerClient) -> str:
    """The sidecar image (base cached by tag; Docker's layer cache for the rest). A failed
    build is not retried for every test of the module."""
    if _build_error:
        pytest.fail(f"building the image failed before: {_build_error[0]}", pytrace=False)
    try:
        tag = build_sidecar_image()
    except BaseException as exc:
        _build_error.append(exc)
        raise
    print(f"image build times: {', '.join(f'{k} {v:.1f}s' for k, v in BUILD_TIMES.items())}")
    return tag


@pytest.fixture
def sidecars(docker_client: docker.DockerClient) -> Iterator[list[Container]]:
    """Containers the test started (sidecars and apps): logs shown on failure, removed by id."""
    started: list[Container] = []
    yield started
    for c in started:
        print(f"----- {c.name} ({c.short_id}) log -----\n{container_logs(c)[-6000:]}")
    remove_containers(docker_client, [str(c.id) for c in started])


def _exit_code(container: Container) -> int | None:
    container.reload()
    if container.status in ("exited", "dead"):
        return int(container.attrs["State"]["ExitCode"])
    return None


def _wait_routed(port: int, name: str, container: Container, timeout: float = 30.0) -> None:
    def routed() -> bool:
        assert _exit_code(container) is None, f"sidecar exited:\n{container_logs(container)}"
        seen = spread(port, 5)
        return set(seen) == {name}

    wait_for(routed, timeout, interval=0.2,
             message=f"requests through 127.0.0.1:{port} to reach {name}")


def _wait_healthy(container: Container, timeout: float = 40.0) -> None:
    def healthy() -> bool:
        assert _exit_code(container) is None, f"sidecar exited:\n{container_logs(container)}"
        return health_status(container) == "healthy"

    wait_for(healthy, timeout, interval=0.25,
             message=f"{container.name}: Docker HEALTHCHECK to report healthy")


def _process_uids(container: Container) -> dict[str, str]:
    """command -> uid of every process in the container (``docker top``)."""
    top = container.top(ps_args="-o pid,uid,args")  # dockerd needs the pid column
    return {row[2]: row[1] for row in top["Processes"]}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(IMAGE_TIMEOUT)
@pytest.mark.usefixtures("example_image")
def test_up_registers_and_routes(
    docker_client: docker.DockerClient,
    sidecar_image: str,
    etcd_single: ServerCluster,
    sidecars: list[Container],
    containers: Callable[..., Container],
) -> None:
    etcd_single.ensure_running()
    url = etcd_single.url(unique_prefix())
    route_port, http_port, dns_port = free_port(), free_port(), free_port()
    service = unique_service()
    node = f"node-{service}"
    started = time.monotonic()
    sidecar = run_sidecar(
        docker_client,
        ["up", "--service", f"{service}:{route_port}", "--http", f"127.0.0.1:{http_port}",
         "--dns", f"127.0.0.1:{dns_port}"],
        image=sidecar_image,
        env={"DISCOVERY_REGISTRY": url, "DISCOVERY_NODE": node, "DISCOVERY_TTL": "5"},
        health_interval=1.0,
    )
    sidecars.append(sidecar)

    # The image's own HEALTHCHECK command (only the interval was overridden).
    image_test = docker_client.images.get(sidecar_image).attrs["Config"]["Healthcheck"]["Test"]
    assert sidecar.attrs["Config"]["Healthcheck"]["Test"] == image_test
    assert image_test[-1] == "/usr/local/bin/discovery-healthcheck"
    _wait_healthy(sidecar)
    ready = time.monotonic() - started

    app = containers(name=service, labels=app_labels(service), healthcheck=app_healthcheck())
    sidecars.append(app)
    [instance] = wait_registered(url, service, timeout=30.0)
    assert instance.node == node
    assert instance.container_id.startswith(str(app.id)[:12])
    _wait_routed(route_port, app.name, sidecar)
    print(f"sidecar healthy {ready:.1f}s after start; app routed "
          f"{time.monotonic() - started:.1f}s after start")

    # Non-root all the way down: tini, discovery and HAProxy; the socket is mounted read-only.
    uids = _process_uids(sidecar)
    assert any("haproxy" in cmd for cmd in uids), uids
    assert set(uids.values()) == {"10001"}, uids
    [mount] = [m for m in sidecar.attrs["Mounts"] if m["Destination"] == DOCKER_SOCKET]
    assert mount["RW"] is False

    # The HTTP API answers on the host network; the health check script sees it as well.
    result = sidecar.exec_run(["discovery-healthcheck"])
    assert result.exit_code == 0, result.output
    assert b'"healthy":true' in result.output

    # docker stop = SIGTERM through tini: everything this node registered goes, exit 0.
    sidecar.stop(timeout=20)
    assert _exit_code(sidecar) == 0, container_logs(sidecar)
    wait_gone(url, service, timeout=5.0)
    assert "up: everything stopped" in container_logs(sidecar)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(IMAGE_TIMEOUT)
@pytest.mark.usefixtures("example_image")
def test_agent_and_watch_as_two_containers(
    docker_client: docker.DockerClient,
    sidecar_image: str,
    zk_single: ServerCluster,
    sidecars: list[Container],
    containers: Callable[..., Container],
    tmp_path: Path,
) -> None:
    """The same image as two containers, settings from env + the mounted TOML file (the
    routed port is only in the file); the watcher needs no Docker socket. The agent starts as
    root with docker-compose.yml's capabilities (SETUID and SETGID alone): it drops to uid
    10001, and SIGHUP and docker stop still reach it (tini, left root, could not signal it)."""
    zk_single.ensure_running()
    url = zk_single.url(unique_prefix())
    route_port, agent_http, watch_http = free_port(), free_port(), free_port()
    service = unique_service()
    config = tmp_path / "discovery.toml"
    config.write_text(
        "[agent]\n"
        "ttl = 6\n"
        "[watcher]\n"
        'wait = "20ms:200ms"\n'
        f"[services.{service}]\n"
        f"port = {route_port}\n"
        'balance = "roundrobin"\n'
    )
    config.chmod(0o644)  # read by uid 10001 in the container
    mount = {str(config): "/etc/discovery/discovery.toml"}
    env = {"DISCOVERY_REGISTRY": url, "DISCOVERY_NODE": f"node-{service}"}
    agent = run_sidecar(docker_client, ["agent"], image=sidecar_image, volumes=mount,
                        env={**env, "DISCOVERY_HTTP": f"127.0.0.1:{agent_http}"},
                        health_interval=1.0, user="0", group_add=False, cap_drop=["ALL"],
                        cap_add=["SETUID", "SETGID"])
    sidecars.append(agent)
    watch = run_sidecar(docker_client, ["watch"], image=sidecar_image, volumes=mount,
                        env={**env, "DISCOVERY_HTTP": f"127.0.0.1:{watch_http}"},
                        docker_socket=False, health_interval=1.0)
    sidecars.append(watch)
    _wait_healthy(agent)
    _wait_healthy(watch)

    app = containers(name=service, labels=app_labels(service), healthcheck=app_healthcheck())
    sidecars.append(app)
    wait_registered(url, service, timeout=30.0)
    _wait_routed(route_port, app.name, watch)
    uids = _process_uids(agent)
    assert set(uids.values()) == {"10001"} and any("tini" in c for c in uids), uids
    agent.kill(signal="SIGHUP")  # re-reads its file, running on
    wait_for(lambda: "configuration reloaded" in container_logs(agent), 15,
             message="the agent's SIGHUP reload")
    assert _exit_code(agent) is None, container_logs(agent)

    agent.stop(timeout=20)
    assert _exit_code(agent) == 0, container_logs(agent)
    wait_gone(url, service, timeout=10.0)
    assert not service_instances(url, service)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(IMAGE_TIMEOUT)
def test_socket_without_group_fails_fast_with_the_fix(
    docker_client: docker.DockerClient, sidecar_image: str, sidecars: list[Container]
) -> None:
    # Runs whatever group owns the socket (gid 0 included: the container's user is not in
    # it either, and the message then says --group-add 0). It only needs the socket to be
    # closed to "others", as dockerd makes it (0660).
    mode = os.stat(DOCKER_SOCKET).st_mode
    assert not mode & 0o006, f"{DOCKER_SOCKET} is open to everyone ({mode & 0o777:o}): " \
                             "the sidecar could use it without any group"
    c = run_sidecar(docker_client, ["up", "--registry", "etcd://127.0.0.1:1/x"],
                    image=sidecar_image, group_add=False)
    sidecars.append(c)
    code = wait_for(lambda: _exit_code(c), 30.0, interval=0.1, message="the sidecar to exit")
    assert code == 77
    assert f"--group-add {docker_socket_gid()}" in container_logs(c)


@pytest.mark.integration
def test_compose_file_is_valid() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose missing: bash scripts/setup.sh installs it"
    cmd = [compose, "-f", str(REPO_ROOT / "docker-compose.yml")]
    check = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True,
                           timeout=60, check=False, cwd=REPO_ROOT)
    assert check.returncode == 0, check.stderr
    services = subprocess.run([*cmd, "config", "--services"], capture_output=True, text=True,
                              timeout=60, check=True, cwd=REPO_ROOT).stdout.split()
    assert {"etcd1", "etcd2", "etcd3", "discovery", "web", "api"} <= set(services), services
    profiles = subprocess.run([*cmd, "config", "--profiles"], capture_output=True, text=True,
                              timeout=60, check=True, cwd=REPO_ROOT).stdout.split()
    assert "zookeeper" in profiles, profiles
