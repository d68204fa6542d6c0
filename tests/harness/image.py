"""The sidecar image (``Dockerfile``) built with no image registry, and containers of it.

Plain functions (no fixtures: tests/test_image.py defines its own, so tests/conftest.py
needs no change):

* :func:`build_base_image` -- ``deploy/build-base.sh``: ``debootstrap --variant=minbase
  bookworm`` + ``docker import``, cached by tag (a hash of that script), so the slow part runs
  once per machine.
* :func:`build_sidecar_image` -- ``deploy/build-image.sh``: the base (cached), wheels of the
  project and its dependencies prepared on the host (``pip wheel``), then ``docker build
  --network none`` installing them with ``pip install --no-index``.
* :func:`run_sidecar` -- a container of that image the way docs/deployment.md runs it:
  ``--network host``, the Docker socket mounted read-only, ``--group-add`` the socket's group,
  labelled ``discovery-test.session=<SESSION_ID>`` (removed by id; the session cleanup of
  tests/harness/dockerd.py catches leftovers).

Both builds time themselves; :data:`BUILD_TIMES` keeps the figures (printed by the test).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from tests.harness.dockerd import NS, SESSION_ID, TEST_LABEL

__all__ = [
    "BUILD_TIMES",
    "DOCKER_SOCKET",
    "SIDECAR_IMAGE_TAG",
    "build_base_image",
    "build_sidecar_image",
    "container_logs",
    "docker_socket_gid",
    "run_sidecar",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_BASE = REPO_ROOT / "deploy" / "build-base.sh"
BUILD_IMAGE = REPO_ROOT / "deploy" / "build-image.sh"
SIDECAR_IMAGE_TAG = "discovery:test"
DOCKER_SOCKET = "/var/run/docker.sock"
# A cold base build is one debootstrap (about a minute, most of it downloading packages).
BUILD_TIMEOUT = 900.0

BUILD_TIMES: dict[str, float] = {}


def _run_script(argv: Sequence[str], what: str) -> str:
    """Run a build script; return the last line of its stdout (the tag). Raises with its
    output on failure."""
    started = time.monotonic()
    proc = subprocess.run(
        list(argv),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", str(REPO_ROOT / ".venv/bin/python"))},
    )
    BUILD_TIMES[what] = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(argv)} printed no tag\n{proc.stderr[-4000:]}")
    return lines[-1].strip()


def build_base_image(force: bool = False) -> str:
    """``deploy/build-base.sh`` -> the base tag (``discovery-base:bookworm-<hash>``)."""
    return _run_script([str(BUILD_BASE), *(["--force"] if force else [])], "base")


def build_sidecar_image(tag: str = SIDECAR_IMAGE_TAG, base: str | None = None) -> str:
    """``deploy/build-image.sh -t tag`` (building or reusing the base) -> ``tag``."""
    if base is None:
        base = build_base_image()
    return _run_script([str(BUILD_IMAGE), "-t", tag, "--base", base], "image")


def docker_socket_gid(path: str = DOCKER_SOCKET) -> int:
    return os.stat(path).st_gid


def run_sidecar(
    client: docker.DockerClient,
    args: Sequence[str],
    *,
    image: str = SIDECAR_IMAGE_TAG,
    env: Mapping[str, str] | None = None,
    docker_socket: bool = True,
    group_add: bool = True,
    user: str | None = None,
    volumes: Mapping[str, str] | None = None,
    rw_volumes: Mapping[str, str] | None = None,
    health_interval: float | None = None,
    name: str | None = None,
    cap_drop: Sequence[str] | None = None,
    cap_add: Sequence[str] | None = None,
) -> Container:
    """Start the sidecar detached: ``docker run -d --network host -v SOCK:SOCK:ro
    [--group-add GID] IMAGE args...``; return the started Container.

    ``docker_socket=False`` mounts no socket (``watch`` needs none) and adds no group.
    ``volumes`` maps host path -> container path (mounted read-only; ``rw_volumes``: writable,
    e.g. a state dir two sidecars share during an upgrade). ``health_interval``
    overrides the image's HEALTHCHECK interval (and start period) while keeping its command:
    Docker takes the test from the image when the container gives none.
    """
    binds: dict[str, dict[str, str]] = {}
    if docker_socket:
        binds[DOCKER_SOCKET] = {"bind": DOCKER_SOCKET, "mode": "ro"}
    for host_path, container_path in (volumes or {}).items():
        binds[host_path] = {"bind": container_path, "mode": "ro"}
    for host_path, container_path in (rw_volumes or {}).items():
        binds[host_path] = {"bind": container_path, "mode": "rw"}
    host_config = client.api.create_host_config(
        network_mode="host",
        binds=binds,
        group_add=[str(docker_socket_gid())] if docker_socket and group_add else None,
        cap_drop=list(cap_drop) if cap_drop else None,
        cap_add=list(cap_add) if cap_add else None,
    )
    healthcheck: dict[str, Any] | None = None
    if health_interval is not None:
        healthcheck = {
            "interval": int(health_interval * NS),
            "start_period": int(max(health_interval, 1.0) * 10 * NS),
            "timeout": int(3 * NS),
            "retries": 3,
        }
    created = client.api.create_container(
        image=image,
        command=list(args),
        name=name,
        detach=True,
        environment=dict(env or {}),
        labels={TEST_LABEL: SESSION_ID},
        host_config=host_config,
        healthcheck=healthcheck,
        user=user or "",
    )
    cid = str(created["Id"])
    try:
        client.api.start(cid)
    except BaseException:
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_container(cid, force=True)
        raise
    return client.containers.get(cid)


def container_logs(container: Container, tail: int = 200) -> str:
    with contextlib.suppress(docker.errors.APIError):
        return container.logs(tail=tail).decode(errors="replace")
    return ""
