"""Traffic quality end to end (issue 14): outlier ejection and zone-aware routing, on a real
etcd, a real watcher process and its HAProxy 2.6, with local HTTP backends."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from discovery.model import Instance
from discovery.registry import Registry, open_registry
from discovery.watcher.haproxy import HAProxyRuntime
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread

pytestmark = pytest.mark.integration


def inst(n: int, port: int, zone: str = "", address: str = "127.0.0.1") -> Instance:
    return Instance(service="web", id=f"h{n}:{n:012x}:80", node=f"h{n}", address=address,
                    port=port, zone=zone)


@pytest.fixture
def reg(etcd_url: str) -> Iterator[Registry]:
    client = open_registry(etcd_url)
    yield client
    client.close(revoke=True)


def health(port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/health")
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 503 still carries the components
        return dict(json.loads(exc.read()))


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        return str(resp.read().decode())


def show(*args: str) -> str:
    """``discovery show`` as a user runs it; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "discovery", "show", *args],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def outlier_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    conf = tmp_path / "watch.toml"
    conf.write_text(f"[services.web]\nport = {port}\n"
                    'outlier = { consecutive_errors = 3, interval = "200ms", '
                    f'base_ejection = "60s" }}\n{extra}')
    return conf


def test_gray_failure_is_ejected_and_clients_stop_seeing_500(
        etcd_url, reg, http_backends, start_watcher, tmp_path):
    a, b, bad = http_backends("a", "b", "bad")
    bad.status = 500  # /health still answers 200: the agent's check would pass
    listen, api = free_port(), free_port()
    for n, backend in enumerate((a, b, bad), 1):
        reg.register(inst(n, backend.port))
    watcher = start_watcher(etcd_url, {}, "--config", str(outlier_config(tmp_path, listen)),
                            "--http", f"127.0.0.1:{api}")
    wait_for(lambda: "bad" in spread(listen, 6) or "!500" in spread(listen, 6), 10,
             message="the bad instance routed")
    # warm-up: requests until the watcher has seen 3 errors in a row and ejected it
    wait_for(lambda: spread(listen, 6) and "ejected" in watcher.log(), 15,
             message="the bad instance ejected")
    after = spread(listen, 60)
    assert after["!500"] == 0 and set(after) == {"a", "b"}, f"after warm-up: {after}"
    line = next(ln for ln in watcher.log().splitlines() if "ejected for" in ln)
    assert "h3:000000000003:80" in line and "errors in a row" in line and "hrsp_5xx" in line
    out = health(api)["components"]["outliers"]
    assert [e["id"] for e in out["ejected"]] == ["h3:000000000003:80"]
    assert "errors in a row" in out["ejected"][0]["reason"] and out["ejections"] == {"web": 1}
    text = metrics(api)
    assert 'discovery_outlier_ejections_total{service="web"} 1.0' in text
    assert 'discovery_outlier_ejected_instances{service="web"} 1.0' in text
    slots = HAProxyRuntime(str(watcher.state_dir / "admin.sock")).slots("web")
    assert {v.state for v in slots.values() if v.port == bad.port} == {"drain"}
    assert "reloaded" not in watcher.log(), "an ejection is a runtime-API change"
    # discovery show, asking the watcher: the ejected instance, its reason and until when
    table = show("web", "--registry", etcd_url, "--watcher", f"127.0.0.1:{api}")
    rows = {ln.split()[0]: ln for ln in table.splitlines()[1:]}
    assert set(rows) == {f"h{n}:{n:012x}:80" for n in (1, 2, 3)}, table
    assert "EJECTED" in table.splitlines()[0] and "REASON" in table.splitlines()[0]
    assert re.search(r"until \d\d:\d\d:\d\dZ \(in (5\d|60)s\)  \d+ errors in a row \(.*hrsp_5xx",
                     rows["h3:000000000003:80"]), table
    assert "until" not in rows["h1:000000000001:80"] + rows["h2:000000000002:80"], table
    by_id = {r["id"]: r for r in json.loads(show("web", "--registry", etcd_url, "--watcher",
                                                 f"127.0.0.1:{api}", "-o", "json"))}
    ejected = by_id["h3:000000000003:80"]["ejected"]
    assert "errors in a row" in ejected["reason"] and ejected["ejections"] == 1
    assert 50 < ejected["back_in_s"] <= 60 and ejected["until"] > time.time() + 45
    assert by_id["h1:000000000001:80"]["ejected"] is None


# busybox httpd runs /cgi-bin/index.cgi for "/" once index.html is gone; a CGI whose output
# starts with a status line is sent as it is
GRAY_CGI = ('#!/bin/sh\nprintf "HTTP/1.0 500 Internal Server Error\\r\\n'
            'Content-Length: 0\\r\\n\\r\\n"\n')
CGI = "/tmp/www/cgi-bin/index.cgi"
GRAY = (f"mkdir -p /tmp/www/cgi-bin && printf %s {shlex.quote(GRAY_CGI)} > {CGI}"
        f" && chmod 755 {CGI} && rm /tmp/www/index.html")


def test_gray_failure_of_a_container_through_agent_and_watcher(
        etcd_url, containers, start_agent, start_watcher, tmp_path):
    """The real agent checks a container's static /health (it passes) while the app's traffic
    path, a CGI, answers 500: registered, routed, ejected; after warm-up no client sees a 500."""
    listen = free_port()
    start_agent(etcd_url)
    labels = {"discovery.service": "web", "discovery.check": "http",
              "discovery.check.path": "/health", "discovery.check.interval": "200ms"}
    apps = {}
    for name in ("good-1", "good-2", "gray"):
        port = free_port()
        apps[name] = containers(name=f"{name}-{uuid.uuid4().hex[:6]}", port=port,
                                labels={**labels, "discovery.port": str(port)})
    done = apps["gray"].exec_run(["sh", "-c", GRAY])
    assert done.exit_code == 0, done.output
    watcher = start_watcher(etcd_url, {}, "--config", str(outlier_config(tmp_path, listen)))
    wait_for(lambda: "!500" in spread(listen, 6), 15, message="the gray instance routed")
    wait_for(lambda: spread(listen, 6) and "ejected" in watcher.log(), 10,
             message="the gray instance ejected")
    after = spread(listen, 60)
    assert after["!500"] == 0 and len(after) == 2, f"after warm-up: {after}"
    assert all(name.startswith("good-") for name in after), after


def test_ejection_comes_back_after_base_ejection(etcd_url, reg, http_backends, start_watcher,
                                                 tmp_path):
    a, flaky = http_backends("a", "flaky")
    flaky.status = 500
    listen = free_port()
    reg.register(inst(1, a.port))
    reg.register(inst(2, flaky.port))
    conf = tmp_path / "watch.toml"
    conf.write_text(f"[services.web]\nport = {listen}\noutlier = {{ consecutive_errors = 2, "
                    'interval = "100ms", base_ejection = "1s", max_ejected = 1 }\n')
    watcher = start_watcher(etcd_url, {}, "--config", str(conf))
    wait_for(lambda: spread(listen, 4) and "ejected for 1.0s" in watcher.log(), 15,
             message="first ejection (1 s)")
    flaky.status = 200  # it recovers while out
    # back within the ejection + the detector's interval + 1 s, seen here (polled) a little late
    wait_for(lambda: "back in" in watcher.log(), 1.0 + 0.1 + 1.0,
             message="readmitted after base_ejection")
    wait_for(lambda: spread(listen, 10)["flaky"] > 0, 5, message="flaky served again")
    flaky.status = 500
    wait_for(lambda: spread(listen, 4) and "ejected for 2.0s (ejection 2)" in watcher.log(),
             15, message="second ejection lasts twice as long")
    ejected = time.monotonic()
    flaky.status = 200
    wait_for(lambda: "back in after 2.0s out (ejection 2)" in watcher.log(), 2.0 + 0.1 + 1.0,
             message="readmitted after twice base_ejection")
    assert time.monotonic() - ejected >= 2.0 - 0.5, "out for its whole 2 s ejection"


def test_max_ejected_caps_two_bad_of_three_to_one(etcd_url, reg, http_backends, start_watcher,
                                                 tmp_path):
    good, bad1, bad2 = http_backends("good", "bad1", "bad2")
    bad1.status = bad2.status = 500
    listen, api = free_port(), free_port()
    for n, backend in enumerate((good, bad1, bad2), 1):
        reg.register(inst(n, backend.port))
    watcher = start_watcher(etcd_url, {}, "--config", str(outlier_config(tmp_path, listen)),
                            "--http", f"127.0.0.1:{api}")
    wait_for(lambda: spread(listen, 6) and "max_ejected" in watcher.log(), 15,
             message="one ejected, the second held by the cap")
    for _ in range(10):  # keep failing: the cap still holds
        spread(listen, 6)
    out = health(api)["components"]["outliers"]
    assert len(out["ejected"]) == 1 and out["held_by_max_ejected"] == {"web": 1}
    assert out["ejections"] == {"web": 1}
    assert watcher.log().count("ejected for") == 1


def test_zone_prefers_local_spills_over_and_comes_back(etcd_url, reg, http_backends,
                                                      start_watcher):
    near, far = http_backends("near", "far")
    listen = free_port()
    reg.register(inst(1, near.port, zone="z1"))
    reg.register(inst(2, far.port, zone="z2"))
    watcher = start_watcher(etcd_url, {"web": listen}, "--zone", "z1")
    wait_for(lambda: spread(listen, 4)["near"] == 4, 10, message="near served")
    assert spread(listen, 20) == {"near": 20}, "the local zone suffices: no cross-zone request"
    reloads = watcher.reload_count()
    reg.deregister("web", inst(1, near.port).id)
    wait_for(lambda: spread(listen, 4)["far"] == 4, 5, message="spill-over to z2")
    reg.register(inst(1, near.port, zone="z1"))
    wait_for(lambda: spread(listen, 10) == {"near": 10}, 5, message="back to the local zone")
    assert watcher.reload_count() == reloads, "spilling over is a runtime-API weight change"


@pytest.mark.parametrize("check", [True, False])
def test_zone_spills_over_when_haproxy_checks_hold_the_local_instance_down(
        etcd_url, reg, http_backends, start_watcher, tmp_path, check):
    """The registry calls the local instance up, but nothing answers at its address (a bad
    record, a path down): HAProxy's checks mark it DOWN. Counted as the local zone's up, it kept
    the other zone at weight 0, and HAProxy, with no server it may use, answered 503. Without
    ``check``: outlier ejection, on by default there, ejects it on its connection errors
    (before: 503 on every host of the zone for as long as the record stayed)."""
    (far,) = http_backends("far")
    listen = free_port()
    reg.register(inst(1, free_port(), zone="z1"))  # no one listens there
    reg.register(inst(2, far.port, zone="z2"))
    conf = tmp_path / "watch.toml"
    conf.write_text(f'[services.web]\nport = {listen}\n' + (
        'check = true\ncheck_options = "inter 200 fall 1 rise 1"\n' if check else ""))
    watcher = start_watcher(etcd_url, {}, "--config", str(conf), "--zone", "z1")
    with ThreadPoolExecutor(8) as pool:  # clients at once (a refused connection is retried
        wait_for(lambda: sum(pool.map(lambda _: spread(listen, 1), range(8)),  # 1 s later)
                             Counter()).get("far") == 8, 10, message="spilled over to z2")
    assert spread(listen, 20) == {"far": 20}
    assert check or "ejected for 10.0s (ejection 1)" in watcher.log()


def test_bad_outlier_config_on_sighup_keeps_the_last_good_one(etcd_url, reg, http_backends,
                                                              start_watcher, tmp_path):
    (a,) = http_backends("a")
    listen = free_port()
    reg.register(inst(1, a.port))
    conf = outlier_config(tmp_path, listen)
    watcher = start_watcher(etcd_url, {}, "--config", str(conf))
    wait_for(lambda: spread(listen, 2)["a"] == 2, 10, message="a served")
    conf.write_text(f"[services.web]\nport = {listen}\noutlier = {{ max_ejected = \"200%\" }}\n")
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: "services.web.outlier.max_ejected" in watcher.log(), 10,
             message="one error naming the key")
    lines = [ln for ln in watcher.log().splitlines() if "outlier.max_ejected" in ln]
    assert len(lines) == 1
    assert spread(listen, 4) == {"a": 4} and watcher.alive


# ---- IPv6 end to end --------------------------------------------------------------------

def test_ipv6_end_to_end(etcd_url, reg, start_watcher):
    import subprocess
    import sys

    from dnslib import QTYPE, DNSRecord

    from discovery.client import Client
    from tests.harness.haproxy import NamedBackend

    backend = NamedBackend("six", host="::1")
    try:
        listen, dns, api = free_port(), free_port(), free_port()
        reg.register(inst(1, backend.port, address="::1"))
        watcher = start_watcher(etcd_url, {}, "--service", f"web:[::1]:{listen}",
                                "--dns", f"[::1]:{dns}", "--http", f"[::1]:{api}")
        config = watcher.config_text()
        assert f"bind [::1]:{listen}" in config and f"[::1]:{backend.port}" in config

        def get(port: int, path: str) -> tuple[int, str]:
            import http.client
            conn = http.client.HTTPConnection("::1", port, timeout=3)
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            finally:
                conn.close()

        wait_for(lambda: get(listen, "/") == (200, "six"), 10, message="served over IPv6")
        status, body = get(api, "/v1/services/web")
        assert status == 200 and [i["address"] for i in json.loads(body)] == ["::1"]
        reply = DNSRecord.parse(DNSRecord.question("web.service.discovery", "AAAA").send(
            "::1", dns, timeout=3, ipv6=True))
        assert [str(r.rdata) for r in reply.rr if QTYPE[r.rtype] == "AAAA"] == ["::1"]
        client = Client(etcd_url)
        try:
            assert [(i.address, i.port) for i in client.instances("web")] == [("::1",
                                                                              backend.port)]
        finally:
            client.close()
        out = subprocess.run([sys.executable, "-m", "discovery", "services", "web",
                              "--registry", etcd_url, "-o", "json"], capture_output=True,
                             text=True, timeout=30, check=True)
        assert [i["address"] for i in json.loads(out.stdout)] == ["::1"]
    finally:
        backend.stop()


def test_slow_start_ramps_a_joining_instance(etcd_url, reg, http_backends, start_watcher,
                                             tmp_path):
    old, new = http_backends("old", "new")
    listen = free_port()
    conf = tmp_path / "watch.toml"
    conf.write_text(f'[services.web]\nport = {listen}\nserver_options = "slowstart 6s"\n')
    reg.register(inst(1, old.port))
    start_watcher(etcd_url, {}, "--config", str(conf))
    wait_for(lambda: spread(listen, 2)["old"] == 2, 10, message="old served")
    reg.register(inst(2, new.port))
    wait_for(lambda: spread(listen, 2) and new.hits > 0, 10,
             message="the new instance gets its first request")
    early = spread(listen, 40)  # the first seconds of the ramp
    assert 0 < early["new"] <= 16, f"a joining instance gets a small share first: {early}"
    wait_for(lambda: spread(listen, 40)["new"] >= 16, 15,
             message="its share grows to about half once the window has passed")


def test_rolling_replacement_under_load_fails_nothing(etcd_url, reg, http_backends,
                                                     start_watcher):
    """Every instance replaced while requests lasting 0-2 s flow: the record goes first (the
    agent deletes it on Docker's kill event), the app serves its in-flight requests for its
    grace period, then exits. The watcher drains it; no request fails."""
    import http.client
    import random
    import threading

    listen = free_port()
    old = http_backends("v1-1", "v1-2", "v1-3")
    for n, b in enumerate(old, 1):
        reg.register(inst(n, b.port))
    watcher = start_watcher(etcd_url, {"web": listen})
    runtime = HAProxyRuntime(str(watcher.state_dir / "admin.sock"))
    wait_for(lambda: set(spread(listen, 12)) == {"v1-1", "v1-2", "v1-3"}, 10,
             message="v1 served")
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
            try:
                conn.request("GET", f"/?sleep={random.uniform(0, 2):.2f}",
                             headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                outcomes.append(str(resp.status))
            except OSError as exc:
                outcomes.append(type(exc).__name__)
            finally:
                conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for n, gone in enumerate(old, 1):
            (new,) = http_backends(f"v2-{n}")
            reg.register(inst(10 + n, new.port))
            wait_for(lambda new=new: new.hits > 0, 15, message=f"v2-{n} served")
            slot = next(name for name, view in runtime.slots("web").items()
                        if view.port == gone.port)
            reg.deregister("web", inst(n, gone.port).id)
            # grace: the old app finishes what it has (at most 2 s), then exits
            wait_for(lambda slot=slot: _idle(runtime, slot), 10, message=f"v1-{n} drained")
            gone.stop()
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert len(outcomes) > 20 and set(outcomes) == {"200"}, sorted(set(outcomes))


def _idle(runtime: HAProxyRuntime, slot: str) -> bool:
    """The slot is out of rotation and has no session left (HAProxy's ``scur``)."""
    row = runtime.stat().get(("web", slot), {})
    return row.get("status") == "MAINT" and row.get("scur") == "0"
