"""The status page (GET /ui/) of a running `discovery up --dev`, in headless Chromium.

Uses the system Chromium and chromedriver (Debian packages, installed by scripts/setup.sh);
selenium-manager never runs (the driver's path is given). A missing browser fails the test
with a message saying what to install: it never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import REPO_ROOT, DiscoveryProcess
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<i id=pwned>x</i>"
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"


@pytest.fixture
def browser() -> Iterator[object]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                    "(scripts/setup.sh does)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium missing: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100", "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def get_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
        return json.loads(resp.read())


def test_status_page_live_in_a_real_browser(containers, agents, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    driver: object = browser
    web = f"s{uuid.uuid4().hex[:8]}"
    listen, http_port = free_port(), free_port()
    proc = DiscoveryProcess(["up", "--dev", "--service", f"{web}:{listen}", "--dns", "off",
                             "--http", f"127.0.0.1:{http_port}", "--node", "uinode"],
                            "up", tmp_path).start()
    agents.append(proc)
    wait_for(lambda: get_json(http_port, "/v1/health"), 30, message="the HTTP API")
    ports = [free_port(), free_port()]
    started = []
    for n, port in enumerate(ports, 1):
        labels = {"discovery.service": web, "discovery.port": str(port),
                  "discovery.tags": "blue", "discovery.check.interval": "200ms"}
        if n == 1:
            labels["discovery.meta.note"] = HOSTILE
        started.append(containers(name=f"{web}-{n}", port=port, labels=labels))
    found = wait_for(lambda: len(get_json(http_port, f"/v1/services/{web}")) == 2  # type: ignore[arg-type]
                     and get_json(http_port, f"/v1/services/{web}"), 20,
                     message="both instances in the HTTP API")
    ids = {i["container_name"]: i["id"] for i in found}  # type: ignore[union-attr]

    driver.get(f"http://127.0.0.1:{http_port}/ui/")  # type: ignore[attr-defined]

    def rows() -> dict[str, str]:
        return {r.get_attribute("data-id"): r.text for r in driver.find_elements(  # type: ignore[attr-defined]
            By.CSS_SELECTOR, f'[data-service="{web}"] tr.instance')}

    shown = wait_for(lambda: set(rows()) == set(ids.values()) and rows(), 15,
                     message="both instances on the page")
    hostile_row = shown[ids[f"{web}-1"]]
    assert HOSTILE in hostile_row, hostile_row  # the literal text, visible
    assert driver.find_elements(By.ID, "pwned") == []  # type: ignore[attr-defined]
    assert "uinode" in hostile_row and "blue" in hostile_row and "tcp" in hostile_row
    header = driver.find_element(By.CSS_SELECTOR, f'[data-service="{web}"] h3').text  # type: ignore[attr-defined]
    assert "2 up / 0 draining" in header, header

    def backend_text() -> str:
        return str(driver.find_element(  # type: ignore[attr-defined]
            By.CSS_SELECTOR, f'[data-backend="{web}"]').text)

    backend = wait_for(lambda: "2 of" in backend_text() and backend_text(), 15,
                       message="the HAProxy view of the backend")
    assert ids[f"{web}-1"] in backend and "ready" in backend, backend
    wait_for(lambda: "check_passed" in driver.find_element(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, f'tr[data-id="{ids[f"{web}-1"]}"] details').get_attribute(
        "textContent"), 10, message="the instance's history on the page")
    stage = wait_for(lambda: driver.find_element(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, '[data-stage="event_to_applied"]').text, 10, message="propagation")
    assert stage.split()[2] != "0", stage  # at least one change timed end to end
    driver.execute_script("window.stillTheSamePage = true")  # type: ignore[attr-defined]
    started[1].stop(timeout=5)
    wait_for(lambda: set(rows()) == {ids[f"{web}-1"]}, 15,
             message="the stopped instance gone from the page")
    assert driver.execute_script("return window.stillTheSamePage") is True  # type: ignore[attr-defined]
    departed = wait_for(lambda: driver.find_element(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, f'tr.departed[data-id="{ids[f"{web}-2"]}"]').text, 10,
        message="the departed instance and its cause")
    assert "kill" in departed or "stop" in departed, departed
    driver.set_window_size(1500, 1500)  # type: ignore[attr-defined]
    driver.save_screenshot(str(tmp_path / "status-page.png"))  # type: ignore[attr-defined]
    if os.environ.get("DISCOVERY_UPDATE_SCREENSHOT") == "1":  # docs/status-page.png
        shutil.copy(tmp_path / "status-page.png", SCREENSHOT)

    def history(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "discovery", "history", *args,
                               "--agent", f"127.0.0.1:{http_port}"], capture_output=True,
                              text=True, timeout=30, check=False, cwd=REPO_ROOT)

    out = history(ids[f"{web}-2"], "-o", "json")
    assert out.returncode == 0, out.stderr
    (gone,) = json.loads(out.stdout)
    assert gone["live"] is False and gone["state"] == "gone"
    # drained on docker stop's kill (the container still runs), then gone when it dies
    assert [t["state"] for t in gone["transitions"]][-3:] == ["up", "down", "gone"], gone
    assert "kill" in json.dumps(gone["transitions"][-2]), gone
    assert gone["transitions"][-1]["cause"] in ("kill", "stop"), gone
    table = history(web)
    assert table.returncode == 0 and "check_passed" in table.stdout, table.stdout + table.stderr
    for unknown in ("nosuch:000000000000:1", "nosuchservice"):
        bad = history(unknown)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_maintenance_survives_an_agent_restart(etcd_single, containers, agents, browser,
                                              tmp_path: Path) -> None:
    """... and an agent's own page (no catalog) lists a service named like a JavaScript
    object's own property (`constructor`: the page's script used to stop there)."""
    from discovery.model.instance import State
    from tests.harness.agent import registry_instances, wait_registered
    from tests.harness.servers import unique_prefix

    etcd_single.ensure_running()
    url = etcd_single.url(unique_prefix())
    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex * 2)
    token.chmod(0o600)
    node, state = f"n{uuid.uuid4().hex[:8]}", tmp_path / "agent-state"

    def agent() -> tuple[DiscoveryProcess, int]:
        port = free_port()
        proc = DiscoveryProcess(["agent", "--registry", url, "--node", node, "--state-dir",
                                 str(state), "--http", f"127.0.0.1:{port}",
                                 "--http-token-file", str(token)], "agent", tmp_path).start()
        agents.append(proc)
        wait_for(lambda: get_json(port, "/v1/health") is not None, 30, message="the agent")
        return proc, port

    first, port = agent()
    web, app_port = "constructor", free_port()  # the registry prefix is the test's own
    containers(name=f"p{uuid.uuid4().hex[:8]}-1", port=app_port, labels={
        "discovery.service": web, "discovery.port": str(app_port),
        "discovery.check.interval": "200ms"})
    victim = wait_registered(url, web)[0]
    out = subprocess.run([sys.executable, "-m", "discovery", "maint", victim.id, "on", "--agent",
                          f"127.0.0.1:{port}", "--http-token-file", str(token)],
                         capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads((state / f"maintenance-{node}.json").read_text())["ids"] == [victim.id]
    first.terminate()
    wait_for(lambda: victim.key not in registry_instances(url), 15, message="deregistered")
    _, port = agent()
    found = wait_for(lambda: registry_instances(url).get(victim.key), 20,
                     message="registered again after the restart")
    assert found.state.value == "draining", found  # straight back in maintenance, no flap

    def history() -> dict[str, Any]:
        (item,) = get_json(port, f"/v1/agent/history?id={victim.id}")["instances"]  # type: ignore[index]
        return item  # type: ignore[no-any-return]

    # the agent records a transition once its write is done: the registry may show it first
    item = wait_for(lambda: (h := history())["transitions"][-1]["state"] == "draining" and h,
                    5, message="the draining transition in the agent's history")
    assert State.UP not in [t["state"] for t in item["transitions"]], item  # never served
    from selenium.webdriver.common.by import By

    driver: Any = browser
    driver.get(f"http://127.0.0.1:{port}/ui/")
    row = wait_for(lambda: [r.text for r in driver.find_elements(
        By.CSS_SELECTOR, '[data-service="constructor"] tr.instance')], 15,
        message="the constructor service on the agent's page")
    assert victim.id in row[0] and "draining" in row[0], row


def test_a_page_left_open_reads_the_catalog_at_most_once_a_second(browser, tmp_path: Path):
    """Each read is the whole catalog (3 MB at 10,000 instances, ~84 ms of the host's CPU): a
    catalog changing 20 times a second made an open page read it 20 times a second."""
    from discovery.lookup.http import HttpApi
    from discovery.model import Instance
    from discovery.model.catalog import Catalog
    from discovery.registry import Change
    from discovery.registry.base import Snapshot

    catalog = Catalog()
    catalog.load(Snapshot({}, revision=1))
    port = free_port()
    api = HttpApi(catalog, dict, None, "127.0.0.1", port).start()
    try:
        browser.get(f"http://127.0.0.1:{port}/ui/")  # type: ignore[attr-defined]
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 4.0:  # 20 changes a second, 4 s
            n += 1
            inst = Instance(service="web", id=f"h{n}:{n:012x}:80", node=f"h{n}",
                            address="127.0.0.1", port=8000)
            catalog.apply(Change("put", key=inst.key, instance=inst, revision=n + 1))
            time.sleep(0.05)
        assert n >= 60
        reads = browser.execute_script(  # type: ignore[attr-defined]
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes('/v1/services')).length")
        assert 3 <= reads <= 6, reads  # 4 s at one a second (+1: the first at once)
    finally:
        api.stop()
