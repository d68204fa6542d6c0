"""Real-dockerd harness: the example app image and containers on loopback (the daemon itself:
:mod:`tests.harness.docker_daemon`).

Plain functions first (usable from the demo script and the benchmarks without pytest),
pytest fixtures at the bottom (this module is listed in ``tests/conftest.py``'s
``pytest_plugins``):

* ``docker_client`` (session) -- ``docker.from_env()``; *fails* (never skips) when dockerd
  is unreachable. At session end it force-removes every container this session started.
* ``example_image`` (session) -- builds (or reuses) ``examples/app`` and returns its tag.
* ``containers`` (function) -- factory around :func:`run_app`; force-removes what it
  started at teardown.

Every container started here carries the label ``discovery-test.session=<SESSION_ID>`` so that
cleanup removes exactly those, by id -- never by a name pattern across the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from discovery.watcher.adopt import alive
from tests.harness.util import free_port, wait_for

try:
    import pytest
except ImportError:  # pragma: no cover - plain-function use (demo, benchmarks) without pytest
    pytest = None  # type: ignore[assignment]

__all__ = [
    "EXAMPLE_APP_DIR",
    "EXAMPLE_IMAGE_TAG",
    "IMAGE_HASH_LABEL",
    "SESSION_ID",
    "TEST_LABEL",
    "ContainerFactory",
    "app_healthcheck",
    "app_port",
    "build_example_image",
    "cleanup_session_containers",
    "example_image_hash",
    "free_port",
    "health_status",
    "remove_containers",
    "run_app",
    "set_app_healthy",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_APP_DIR = REPO_ROOT / "examples" / "app"
EXAMPLE_APP_FILES = ("Dockerfile", "serve.sh")
BUSYBOX = Path("/bin/busybox")
EXAMPLE_IMAGE_TAG = "discovery-example-app:test"
# Containers inherit image labels, so this one too stays outside "discovery.".
IMAGE_HASH_LABEL = "example-app.content-hash"
# Not "discovery.test": the agent rejects unknown keys under "discovery." (LabelError
# "unknown label"), so every harness label stays outside that namespace.
TEST_LABEL = "discovery-test.session"

# "<pid>-<random>": unique per test process (and per xdist worker). The pid part lets
# run_app recognise leftovers of a dead session (killed -9, no teardown) by name clash.
SESSION_ID: str = os.environ.get("DISCOVERY_TEST_SESSION") or (
    f"{os.getpid()}-{secrets.token_hex(4)}"
)

NS = 1_000_000_000  # docker healthcheck durations are in nanoseconds


# --------------------------------------------------------------------------- the image


def example_image_hash() -> str:
    """sha256 over examples/app/{Dockerfile,serve.sh} and the busybox binary."""
    h = hashlib.sha256()
    for name in EXAMPLE_APP_FILES:
        h.update(name.encode() + b"\0")
        h.update((EXAMPLE_APP_DIR / name).read_bytes() + b"\0")
    h.update(b"busybox\0" + BUSYBOX.read_bytes())
    return h.hexdigest()


def build_example_image(
    client: docker.DockerClient, tag: str = EXAMPLE_IMAGE_TAG, *, force: bool = False
) -> str:
    """Build ``examples/app`` as ``tag`` and return the tag.

    Cached: when an image with ``tag`` exists and its ``example-app.content-hash`` label
    equals :func:`example_image_hash`, nothing is built. The build context is a temporary
    directory holding the Dockerfile, serve.sh and a copy of /bin/busybox (Debian's
    busybox-static), so no binary is ever committed and no registry is needed.
    """
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} missing: apt-get install busybox-static")
    digest = example_image_hash()
    if not force:
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            pass
        else:
            if (image.labels or {}).get(IMAGE_HASH_LABEL) == digest:
                return tag
    with tempfile.TemporaryDirectory(prefix="discovery-example-app-") as ctx:
        for name in EXAMPLE_APP_FILES:
            shutil.copy2(EXAMPLE_APP_DIR / name, Path(ctx) / name)
        shutil.copy2(BUSYBOX, Path(ctx) / "busybox")
        try:
            client.images.build(
                path=ctx,
                tag=tag,
                labels={IMAGE_HASH_LABEL: digest},
                rm=True,
                forcerm=True,
                pull=False,
                # dockerd runs with --bridge=none: RUN steps need the host network.
                network_mode="host",
            )
        except docker.errors.BuildError as exc:
            log = "".join(
                str(chunk.get("stream") or chunk.get("error") or "")
                for chunk in exc.build_log
                if isinstance(chunk, dict)
            )
            raise RuntimeError(f"building {tag} failed: {exc.msg}\n{log}") from exc
    return tag


# --------------------------------------------------------------------------- containers


def app_healthcheck(
    interval: float = 0.2,
    timeout: float = 1.0,
    retries: int = 2,
    start_period: float = 0.0,
    path: str = "/health",
) -> dict[str, Any]:
    """A docker-py ``healthcheck`` dict probing the app's ``/health`` (durations in s).

    ``$PORT`` is expanded inside the container (CMD-SHELL), so it fits any instance.
    """
    hc: dict[str, Any] = {
        "test": ["CMD-SHELL", f"wget -q -O /dev/null http://127.0.0.1:$PORT{path}"],
        "interval": int(interval * NS),
        "timeout": int(timeout * NS),
        "retries": retries,
    }
    if start_period > 0:
        hc["start_period"] = int(start_period * NS)
    return hc


def _stale_harness_container(client: docker.DockerClient, name: str) -> Container | None:
    """The container called ``name`` if it is a leftover of a *dead* harness session."""
    try:
        other = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    owner = (other.labels or {}).get(TEST_LABEL)
    if not owner or owner == SESSION_ID:
        return None
    pid_part = owner.split("-", 1)[0]
    if not pid_part.isdigit() or alive(int(pid_part)):
        return None
    return other


def run_app(
    client: docker.DockerClient,
    *,
    name: str,
    port: int,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    healthcheck: Mapping[str, Any] | None = None,
    network_mode: str = "host",
    expose: bool = True,
    image: str = EXAMPLE_IMAGE_TAG,
    restart_policy: Mapping[str, Any] | None = None,
    stop_signal: str | None = None,
) -> Container:
    """Start the example app detached and return the (started) Container.

    * container name and env ``NAME`` are ``name``; env ``PORT`` is ``port``; ``env``
      is merged on top (e.g. ``{"HEALTHY": "0"}``);
    * ``--network host`` by default, httpd binds 127.0.0.1:``port``;
    * ``expose=True`` is ``--expose port`` (Config.ExposedPorts has ``"<port>/tcp"``);
    * ``labels`` plus ``discovery-test.session=<SESSION_ID>``;
    * ``healthcheck`` is a docker-py healthcheck dict (see :func:`app_healthcheck`);
    * ``restart_policy`` e.g. ``{"Name": "always"}`` (survives a dockerd restart,
      :func:`tests.harness.docker_daemon.restart_dockerd`);
    * ``stop_signal`` e.g. ``"SIGWINCH"`` (``--stop-signal``: what ``docker stop`` sends).

    The image must already exist (:func:`build_example_image`). A name clash with a
    leftover of a dead harness session is resolved by removing that container; any other
    clash raises ``docker.errors.APIError``.
    """
    api = client.api
    all_labels = {**(labels or {}), TEST_LABEL: SESSION_ID}
    environment = {"PORT": str(port), "NAME": name, **(env or {})}
    host_config = api.create_host_config(
        network_mode=network_mode,
        restart_policy=dict(restart_policy) if restart_policy else None,
    )

    def create() -> str:
        created = api.create_container(
            image=image,
            name=name,
            detach=True,
            environment=environment,
            labels=all_labels,
            ports=[port] if expose else None,
            host_config=host_config,
            healthcheck=dict(healthcheck) if healthcheck else None,
            stop_signal=stop_signal,
        )
        return str(created["Id"])

    try:
        cid = create()
    except docker.errors.APIError as exc:
        stale = _stale_harness_container(client, name) if exc.status_code == 409 else None
        if stale is None:
            raise
        stale.remove(force=True)
        cid = create()
    try:
        api.start(cid)
    except BaseException:
        with contextlib.suppress(docker.errors.APIError):
            api.remove_container(cid, force=True)
        raise
    return client.containers.get(cid)


def app_port(container: Container) -> int:
    """The PORT the example app in ``container`` listens on (from its env)."""
    for item in container.attrs["Config"].get("Env") or []:
        key, _, value = item.partition("=")
        if key == "PORT":
            return int(value)
    raise KeyError(f"container {container.name} has no PORT in its env")


def set_app_healthy(container: Container, healthy: bool) -> None:
    """Flip the app's /health at runtime (creates or deletes /tmp/www/health)."""
    cmd = "echo ok > /tmp/www/health" if healthy else "rm -f /tmp/www/health"
    result = container.exec_run(["/bin/sh", "-c", cmd])
    if result.exit_code != 0:
        raise RuntimeError(f"exec in {container.name} failed: {result.output!r}")


def health_status(container: Container) -> str | None:
    """``State.Health.Status`` (starting/healthy/unhealthy) after a reload; None if none."""
    container.reload()
    health = container.attrs.get("State", {}).get("Health")
    return None if not health else str(health.get("Status"))


def remove_containers(client: docker.DockerClient, ids: Sequence[str]) -> None:
    """Force-remove the containers with these ids (and their anonymous volumes)."""
    for cid in ids:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                client.api.remove_container(cid, force=True, v=True)
            except docker.errors.APIError as exc:
                # 409 "removal already in progress" is fine; anything else is not.
                if exc.status_code != 409:
                    raise


def cleanup_session_containers(client: docker.DockerClient, session: str = SESSION_ID) -> list[str]:
    """Force-remove every container labelled ``discovery-test.session=<session>``; return ids."""
    found = client.api.containers(
        all=True, quiet=True, filters={"label": f"{TEST_LABEL}={session}"}
    )
    ids = [str(c["Id"]) for c in found]
    remove_containers(client, ids)
    return ids


# --------------------------------------------------------------------------- fixtures


class ContainerFactory:
    """``containers(name=..., port=..., labels=..., ...)`` -> started Container.

    Same keywords as :func:`run_app` (``port`` defaults to a free port). Everything it
    started is force-removed by :meth:`close` (the fixture calls it at teardown).
    """

    def __init__(self, client: docker.DockerClient, image: str = EXAMPLE_IMAGE_TAG) -> None:
        self.client = client
        self.image = image
        self.started: list[Container] = []

    def __call__(
        self,
        *,
        name: str,
        port: int | None = None,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        healthcheck: Mapping[str, Any] | None = None,
        network_mode: str = "host",
        expose: bool = True,
        restart_policy: Mapping[str, Any] | None = None,
        stop_signal: str | None = None,
    ) -> Container:
        container = run_app(
            self.client,
            name=name,
            port=free_port() if port is None else port,
            labels=labels,
            env=env,
            healthcheck=healthcheck,
            network_mode=network_mode,
            expose=expose,
            image=self.image,
            restart_policy=restart_policy,
            stop_signal=stop_signal,
        )
        self.started.append(container)
        return container

    def instance(self, name: str, service: str) -> int:
        """An app registered as ``service`` on a free port, checked every 200 ms: its port."""
        port = free_port()
        self(name=name, port=port, labels={"discovery.service": service,
                                           "discovery.port": str(port),
                                           "discovery.check.interval": "200ms"})
        return port

    def close(self) -> None:
        ids = [str(c.id) for c in self.started]
        self.started.clear()
        remove_containers(self.client, ids)


if pytest is not None:

    @pytest.fixture(scope="session")
    def docker_client() -> Iterator[docker.DockerClient]:
        """docker.from_env(); fails (never skips) when dockerd is unreachable."""
        error: Exception | None = None
        try:
            client = docker.from_env()
            client.ping()
        except Exception as exc:
            error = exc
        if error is not None:
            pytest.fail(
                f"dockerd is not reachable ({error}). These tests need a real dockerd: "
                "run `bash scripts/setup.sh` (or `make setup`), which starts one.",
                pytrace=False,
            )
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                cleanup_session_containers(client)
            client.close()

    @pytest.fixture(scope="session")
    def example_image(docker_client: docker.DockerClient) -> str:
        """Tag of the example app image (built once, cached by content hash)."""
        return build_example_image(docker_client)

    @pytest.fixture
    def containers(
        docker_client: docker.DockerClient, example_image: str
    ) -> Iterator[ContainerFactory]:
        """Factory starting example-app containers; force-removes them at teardown."""
        factory = ContainerFactory(docker_client, example_image)
        try:
            yield factory
        finally:
            factory.close()
