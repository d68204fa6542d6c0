"""A third-party check type, installed with pip, loaded and run by the real agent.

``examples/check-plugin`` (check type ``httpbody``: 2xx *and* the body contains a string) is
pip-installed into a temporary directory -- never into the project's venv -- which is put on
the agent's PYTHONPATH. The example app then answers ``/health`` with 200 "degraded" or
200 "ok": only a check that reads the body tells them apart, so registration following the
body proves the agent runs the plugin, with the labelled interval/rise/fall.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from importlib.metadata import distributions
from typing import Any

import pytest
from docker.models.containers import Container

from tests.harness.agent import REPO_ROOT, service_instances, wait_gone, wait_registered
from tests.harness.dockerd import ContainerFactory, set_app_healthy
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration

PLUGIN_DIR = REPO_ROOT / "examples" / "check-plugin"
INTERVAL, RISE, FALL = 0.3, 2, 3


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``pip install --target`` of a copy of examples/check-plugin (the copy keeps setuptools'
    build/ and *.egg-info out of the source tree). Offline when the venv can build it itself."""
    base = tmp_path_factory.mktemp("check-plugin")
    source, target = base / "src", base / "site"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--target", str(target), str(source)]
    if all(importlib.util.find_spec(m) for m in ("setuptools", "wheel")):
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"installing {PLUGIN_DIR} failed ({' '.join(cmd)}):\n"
                    f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}", pytrace=False)
    eps = [ep for dist in distributions(path=[str(target)]) for ep in dist.entry_points
           if ep.group == "discovery.checks"]
    assert [(ep.name, ep.value) for ep in eps] == [("httpbody", "discovery_check_example:httpbody")]
    return str(target)


def serve(app: Container, body: str) -> None:
    """Make the app's /health answer 200 with ``body``."""
    result = app.exec_run(["/bin/sh", "-c", f"printf '%s\\n' '{body}' > /tmp/www/health"])
    assert result.exit_code == 0, result.output


def probes(app: Container, status: int) -> int:
    """How many requests the app answered with ``status`` so far."""
    return app.logs().decode(errors="replace").count(f"response:{status}")


def test_agent_runs_the_installed_plugin(
    registry_url: str, plugin_path: str, start_agent: Callable[..., Any],
    containers: ContainerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (plugin_path, os.environ.get("PYTHONPATH")) if p))
    agent = start_agent(registry_url)
    service = f"plug{uuid.uuid4().hex[:6]}"
    port = free_port()
    app = containers(name=f"{service}-1", port=port, env={"HEALTHY": "0"}, labels={
        "discovery.service": service, "discovery.port": str(port),
        "discovery.check": "httpbody", "discovery.check.path": "/health",
        "discovery.check.contains": "ok", "discovery.check.interval": f"{INTERVAL}s",
        "discovery.check.timeout": f"{INTERVAL}s",  # at most the interval
        "discovery.check.rise": str(RISE), "discovery.check.fall": str(FALL)})

    # 404, then 200 "degraded": a status-only check would register it now; httpbody must not.
    # (busybox httpd logs one "response:<code>" line per request: the agent's probes.)
    wait_for(lambda: probes(app, 404) >= 1, timeout=20, message="the agent's first probe")
    serve(app, "degraded")
    registered_while_degraded: list[object] = []

    def degraded_probes_seen() -> bool:  # wait_for retries on exceptions: record, don't assert
        if service_instances(registry_url, service) or not agent.alive:
            registered_while_degraded.append(service_instances(registry_url, service))
        return bool(registered_while_degraded) or probes(app, 200) >= RISE + 2

    wait_for(degraded_probes_seen, timeout=20, message=f"{RISE + 2} degraded probes")
    assert registered_while_degraded == [], "registered while degraded (or the agent died)"
    assert service_instances(registry_url, service) == []

    # "ok": registered after RISE passing runs.
    started = time.monotonic()
    serve(app, "ok")
    [instance] = wait_registered(registry_url, service, timeout=RISE * INTERVAL + 2)
    assert time.monotonic() - started >= (RISE - 1) * INTERVAL - 0.05
    assert (instance.port, instance.container_id) == (port, app.id)

    # "degraded" again: deregistered after FALL failing runs, not at the first one.
    started = time.monotonic()
    serve(app, "degraded")
    wait_gone(registry_url, service, timeout=FALL * INTERVAL + 2)
    assert time.monotonic() - started >= (FALL - 1) * INTERVAL - 0.05
    wait_for(lambda: "body lacks 'ok'" in agent.log(), timeout=5,
             message="the plugin's output in the agent log")

    # and back, then a 404
    serve(app, "ok")
    wait_registered(registry_url, service, timeout=RISE * INTERVAL + 2)
    set_app_healthy(app, False)
    wait_gone(registry_url, service, timeout=FALL * INTERVAL + 2)
    assert agent.alive


def test_a_missing_required_label_is_refused(
    registry_url: str, plugin_path: str, start_agent: Callable[..., Any],
    containers: ContainerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``httpbody`` without ``discovery.check.contains``: refused with a message naming the
    label; nothing registered; the agent carries on with other containers, including ones
    started later."""
    monkeypatch.setenv("PYTHONPATH", plugin_path)
    service = f"plug{uuid.uuid4().hex[:6]}"
    good = {"discovery.check": "httpbody", "discovery.check.contains": "ok",
            "discovery.check.path": "/health", "discovery.check.interval": "200ms"}
    port, good_port, late_port = free_port(), free_port(), free_port()
    containers(name=f"{service}-1", port=port, labels={  # there before the agent starts
        "discovery.service": service, "discovery.port": str(port),
        "discovery.check": "httpbody"})
    containers(name=f"{service}-2", port=good_port, labels={
        "discovery.service": f"{service}b", "discovery.port": str(good_port), **good})
    agent = start_agent(registry_url)
    wait_registered(registry_url, f"{service}b", timeout=20)
    wait_for(lambda: "httpbody check needs discovery.check.contains" in agent.log(), timeout=10,
             message="the agent to name the missing label")
    containers(name=f"{service}-3", port=late_port, labels={
        "discovery.service": f"{service}c", "discovery.port": str(late_port), **good})
    wait_registered(registry_url, f"{service}c", timeout=20)
    assert service_instances(registry_url, service) == []
    assert agent.alive


def test_without_the_plugin_the_type_is_unknown(
    registry_url: str, start_agent: Callable[..., Any], containers: ContainerFactory,
) -> None:
    """The control: the same labels with the plugin not installed register nothing, and the
    agent says why (so the test above really depends on the installed package)."""
    agent = start_agent(registry_url)
    service = f"plug{uuid.uuid4().hex[:6]}"
    port = free_port()
    containers(name=f"{service}-1", port=port, labels={
        "discovery.service": service, "discovery.port": str(port),
        "discovery.check": "httpbody", "discovery.check.contains": "ok"})
    wait_for(lambda: "unknown check type 'httpbody'" in agent.log(), timeout=20,
             message="the agent to refuse the unknown check type")
    assert service_instances(registry_url, service) == []
    assert agent.alive
