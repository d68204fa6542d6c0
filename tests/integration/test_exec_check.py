"""ExecCheck and DockerCheck against a real dockerd: the command runs inside the container.

Self-contained: builds its own tiny image FROM scratch with Debian's static busybox
(``apt-get install busybox-static``) and runs one container with ``--network host``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from discovery.agent.checks import DockerCheck, ExecCheck
from discovery.agent.spec import CheckResult, CheckSpec, CheckTarget
from tests.harness.util import require_tool, wait_for

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
IMAGE = "discovery-test-exec-check:1"
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD ["test", "-f", "/healthy"]
CMD ["sleep", "3600"]
"""


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    require_tool(str(BUSYBOX), "busybox-static")
    try:
        cli = docker.from_env(timeout=30)
        cli.ping()
    except Exception as exc:  # scripts/setup.sh starts dockerd: its absence is a failure
        pytest.fail(f"dockerd unreachable (scripts/setup.sh starts it): {exc}", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="discovery-exec-check-") as ctx:
        (Path(ctx) / "Dockerfile").write_text(DOCKERFILE)
        shutil.copy2(BUSYBOX, Path(ctx) / "busybox")
        cli.images.build(
            path=ctx, tag=IMAGE, rm=True, forcerm=True, pull=False, network_mode="host"
        )
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def container(client: Any) -> Iterator[Any]:
    c = client.containers.run(
        IMAGE,
        detach=True,
        network_mode="host",
        name=f"discovery-exec-check-{os.getpid()}",
        labels={"discovery-test": "exec-check"},
    )
    try:
        yield c
    finally:
        c.remove(force=True)


def check(client: Any, container: Any, command: str, timeout: float = 5.0) -> CheckResult:
    spec = CheckSpec(type="exec", timeout=timeout, params={"command": command})
    return ExecCheck(spec, CheckTarget("127.0.0.1", 1, container.id, client)).run()


@pytest.mark.parametrize(
    ("command", "want"),
    [
        ("true", CheckResult(True, "exit 0")),
        ("false", CheckResult(False, "exit 1")),
        ('["sh", "-c", "echo err >&2; exit 3"]', CheckResult(False, "exit 3: err")),
        ("echo a; false", CheckResult(True, "exit 0: a; false")),  # no shell: ';' is an argument
        ("echo $HOME $(id)", CheckResult(True, "exit 0: $HOME $(id)")),
        ("test -x /bin/busybox", CheckResult(True, "exit 0")),
    ],
)
def test_exec(client: Any, container: Any, command: str, want: CheckResult) -> None:
    assert check(client, container, command) == want


def test_exec_runs_inside_the_container(client: Any, container: Any, tmp_path: Path) -> None:
    marker = tmp_path / "only-on-the-host"
    marker.write_text("x")
    assert not check(client, container, f"test -e {marker}").ok


def test_exec_missing_binary(client: Any, container: Any) -> None:
    result = check(client, container, "no-such-binary")
    assert not result.ok


def test_exec_timeout(client: Any, container: Any) -> None:
    started = time.monotonic()
    result = check(client, container, "sleep 5", timeout=0.5)
    assert not result.ok and result.output.startswith("timed out after 0.5s")
    assert time.monotonic() - started < 3


def test_exec_on_missing_container(client: Any) -> None:
    spec = CheckSpec(type="exec", params={"command": "true"})
    result = ExecCheck(spec, CheckTarget("127.0.0.1", 1, "0" * 64, client)).run()
    assert not result.ok and "NotFound" in result.output


def test_docker_check_follows_healthcheck(client: Any, container: Any) -> None:
    target = CheckTarget("127.0.0.1", 1, container.id, client)
    probe = DockerCheck(CheckSpec(type="docker"), target)

    def settled(ok: bool) -> CheckResult:
        def probe_once() -> CheckResult | None:
            result = probe.run()
            return result if result.ok is ok and "starting" not in result.output else None

        found: CheckResult = wait_for(probe_once, 20, interval=0.2,
                                      message=f"docker health ok={ok}")
        return found

    assert "unhealthy" in settled(False).output
    assert check(client, container, "touch /healthy").ok
    assert settled(True).output.startswith("docker health healthy")


def test_exec_never_starts_while_the_previous_run_goes_on(
    client: Any, container: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung command is not started again and again (issue 8 §3: 202 processes piled up)."""
    spec = CheckSpec(type="exec", interval=1.0, timeout=0.3, params={"command": "sleep 2.5"})
    probe = ExecCheck(spec, CheckTarget("127.0.0.1", 1, container.id, client))

    def running() -> int:
        out = container.exec_run(["ps", "-o", "args"]).output.decode()
        return out.splitlines().count("sleep 2.5")

    started = time.monotonic()
    with caplog.at_level("INFO", logger="discovery.agent.checks"):
        assert probe.run().output.startswith("timed out after 0.3s")
        for _ in range(10):
            assert probe.run() == CheckResult(False, "previous run still running: "
                                                     "not started again")
        assert running() == 1
        # once the hung command ends by itself, the next run starts a new one
        wait_for(lambda: probe.run().output.startswith("timed out"), timeout=5,
                 message="a new run after the hung one ended")
    assert time.monotonic() - started >= 2.5
    assert running() == 1
    logged = [r.message for r in caplog.records]
    assert sum("previous run still running" in m for m in logged) == 1, logged
    assert sum("previous run ended" in m for m in logged) == 1, logged
