"""Upgrading the sidecar image on a host without dropping a request (docs/deployment.md).

Two containers of the image, ``--network host``, the state dir on a bind-mounted host folder
they share: the new one starts while the old one runs, takes HAProxy's listening sockets over
(``-x`` through the admin socket on the shared volume) and the old watcher — which sees the
new claim in ``haproxy.owner`` — soft-stops its HAProxy; then the old container is stopped.
Steady load (4 clients, a new connection per request) runs through it all: 0 failed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container

from discovery.model import Instance
from discovery.registry import open_registry
from tests.harness.image import container_logs, run_sidecar
from tests.harness.load import SteadyLoad
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread
from tests.integration.test_image import IMAGE_TIMEOUT, sidecar_image, sidecars

__all__ = ["sidecar_image", "sidecars"]
STATE = "/var/lib/discovery/watch"
UID = 10001  # the image's user


@pytest.fixture
def shared_state() -> Iterator[Path]:
    """A host folder for the state dir, owned by the image's user (short: socket paths)."""
    path = Path(tempfile.mkdtemp(prefix="dimg-", dir="/tmp"))
    os.chown(path, UID, UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def logs(container: Container) -> str:
    return container_logs(container, tail=400)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(IMAGE_TIMEOUT)
def test_image_upgrade_drops_no_request(docker_client: docker.DockerClient, sidecar_image: str,
                                        etcd_single: ServerCluster, sidecars: list[Container],
                                        http_backends, shared_state: Path) -> None:
    etcd_single.ensure_running()
    url = etcd_single.url(unique_prefix())
    (a,) = http_backends("a")
    reg = open_registry(url)
    port = free_port()
    try:
        reg.register(Instance(service="web", id="h1:000000000001:80", node="h1",
                              address="127.0.0.1", port=a.port))

        def sidecar() -> Container:
            c = run_sidecar(docker_client, ["watch", "--service", f"web:{port}"],
                            image=sidecar_image, docker_socket=False,
                            env={"DISCOVERY_REGISTRY": url, "DISCOVERY_STATE_DIR": STATE},
                            rw_volumes={str(shared_state): STATE})
            sidecars.append(c)
            return c

        old = sidecar()
        wait_for(lambda: set(spread(port, 4)) == {"a"}, 60, interval=0.2,
                 message=f"the old sidecar routes:\n{logs(old)}")
        with SteadyLoad(port, max_seconds=300) as load:
            new = sidecar()
            wait_for(lambda: "took the listening sockets over" in logs(new), 60, interval=0.2,
                     message="the new sidecar takes the sockets over")
            wait_for(lambda: "another watcher took the HAProxy" in logs(old), 20,
                     interval=0.2, message="the old sidecar lets go")
            load.wait_more(300, timeout=60)
            old.stop(timeout=20)  # SIGTERM: its HAProxy was already soft-stopped
            old.reload()
            assert old.attrs["State"]["ExitCode"] == 0, logs(old)
            load.wait_more(300, timeout=60)
        print(f"\nimage upgrade under load: {load}")
        assert load.failed == 0, str(load)
        new.reload()
        assert new.status == "running", logs(new)
        assert set(spread(port, 4)) == {"a"}
    finally:
        reg.close(revoke=True)
