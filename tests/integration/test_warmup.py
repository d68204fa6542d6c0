"""Warm-up requests (``discovery.warmup.*``) end to end: the real agent, dockerd and etcd."""

from __future__ import annotations

import shlex
import time
import uuid

import pytest

from tests.harness.agent import service_instances, wait_gone, wait_registered
from tests.harness.dockerd import set_app_healthy
from tests.harness.util import free_port

pytestmark = pytest.mark.integration

N = 12
# busybox httpd runs /cgi-bin/hit as a CGI: it notes when it started (the kernel's boot clock,
# which the host reads too), takes 0.1 s, answers 200
HIT_CGI = ('#!/bin/sh\ncat /proc/uptime >> /tmp/hits\nsleep 0.1\n'
           'printf "Content-Type: text/plain\\r\\n\\r\\nwarm\\n"\n')
CGI = "/tmp/www/cgi-bin/hit"
SETUP = f"mkdir -p /tmp/www/cgi-bin && printf %s {shlex.quote(HIT_CGI)} > {CGI} && chmod 755 {CGI}"


def hits(container) -> list[float]:
    """When each warm-up request reached the app, as host wall-clock time."""
    done = container.exec_run(["sh", "-c", "cat /tmp/hits 2>/dev/null || true"])
    assert done.exit_code == 0, done.output
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return [boot + float(line.split()[0]) for line in done.output.decode().splitlines()]


def test_warm_up_requests_reach_the_app_before_its_record(etcd_url, containers, start_agent):
    """N GETs of the warm-up path, all before the record is written; none again after a flap."""
    service, port = f"w{uuid.uuid4().hex[:10]}", free_port()
    agent = start_agent(etcd_url)
    app = containers(name=f"{service}-1", port=port, env={"HEALTHY": "0"}, labels={
        "discovery.service": service, "discovery.port": str(port),
        "discovery.check": "http", "discovery.check.path": "/health",
        "discovery.check.interval": "200ms", "discovery.warmup.requests": str(N),
        "discovery.warmup.path": "/cgi-bin/hit", "discovery.warmup.concurrency": "2"})
    done = app.exec_run(["sh", "-c", SETUP])
    assert done.exit_code == 0, done.output
    assert hits(app) == [] and service_instances(etcd_url, service) == []

    set_app_healthy(app, True)  # the check passes: warm-up first, then the record
    [inst] = wait_registered(etcd_url, service, timeout=15)
    seen = hits(app)
    assert len(seen) == N, seen
    assert max(seen) < inst.registered_at, (max(seen), inst.registered_at)
    assert max(seen) - min(seen) >= (N / 2 - 1) * 0.1  # two at a time, 0.1 s each
    assert f"warmed up: {N} requests to /cgi-bin/hit" in agent.log()

    set_app_healthy(app, False)  # a flap is not a start: no warm-up the second time
    wait_gone(etcd_url, service, timeout=10)
    set_app_healthy(app, True)
    wait_registered(etcd_url, service, timeout=10)
    assert len(hits(app)) == N
    assert agent.log().count("warmed up:") == 1
