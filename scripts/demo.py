#!/usr/bin/env python3
"""`make demo`: `discovery up --dev` (agent + watcher + HAProxy + DNS + HTTP with a private etcd)
and three example containers: two healthy `web` instances and a `billing` one whose health
check fails. Shows `discovery services`, DNS and HTTP answers, requests spread over both web
instances through HAProxy, then one instance stopped under continuous traffic with the failed
requests counted. Stays up until Ctrl-C (or exits with --once), then removes everything."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from tests.harness.agent import DiscoveryProcess  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    app_healthcheck,
    build_example_image,
    remove_containers,
    run_app,
)
from tests.harness.util import free_port, wait_for  # noqa: E402
from tests.harness.watcher import spread  # noqa: E402


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def run(*args: str) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, check=False)
    return (out.stdout + out.stderr).rstrip()


def get_json(port: int, path: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after showing the result")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="discovery-demo-"))
    client = docker.from_env()
    started: list[str] = []
    up: DiscoveryProcess | None = None
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        say("building the example app image (busybox httpd, cached)")
        image = build_example_image(client)
        listen, dns_port, http_port = free_port(), free_port(), free_port()
        say(f"discovery up --dev --service web:{listen} --dns 127.0.0.1:{dns_port} "
            f"--http 127.0.0.1:{http_port}")
        up = DiscoveryProcess(["up", "--dev", "--node", "demo", "--service", f"web:{listen}",
                               "--dns", f"127.0.0.1:{dns_port}",
                               "--http", f"127.0.0.1:{http_port}"], "up", work).start()
        health = wait_for(lambda: get_json(http_port, "/v1/health"), 60, message="discovery up")
        url = health["components"]["registry"]["url"]
        say(f"private registry: {url}")
        specs = [("web-1", "web", "1"), ("web-2", "web", "1"), ("billing-1", "billing", "0")]
        names: dict[str, str] = {}
        for name, service, healthy in specs:
            port = free_port()
            labels = {"discovery.service": service, "discovery.port": str(port),
                      "discovery.tags": "demo"}
            container = run_app(client, name=f"demo-{name}-{port}", port=port, labels=labels,
                                env={"HEALTHY": healthy}, healthcheck=app_healthcheck(),
                                image=image)
            started.append(str(container.id))
            names[name] = str(container.name)
            state = "healthy" if healthy == "1" else "failing its health check"
            say(f"container {name}: service {service} on 127.0.0.1:{port} ({state})")
        t0 = time.monotonic()
        wait_for(lambda: len(get_json(http_port, "/v1/services/web")) == 2, 60,
                 message="both web instances registered")
        wait_for(lambda: len(spread(listen, 4)) == 2, 30, message="both routed")
        say(f"converged in {time.monotonic() - t0:.2f}s; `discovery services --registry {url}`:")
        print(run(sys.executable, "-m", "discovery", "services", "--registry", url), flush=True)
        say("billing is not listed: its health check fails, so it is never registered")
        say(f"dig @127.0.0.1 -p {dns_port} web.service.discovery SRV:")
        print(run("dig", "+short", "-p", str(dns_port), "@127.0.0.1", "web.service.discovery",
                  "SRV"), flush=True)
        say(f"20 requests to 127.0.0.1:{listen}: {dict(sorted(spread(listen, 20).items()))}")
        counts: Counter[str] = Counter()
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                counts.update(spread(listen, 1))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        reloads = get_json(http_port, "/v1/health")["components"]["haproxy"]["reloads"]
        say("stopping web-1 (docker stop) while requests keep flowing")
        client.containers.get(names["web-1"]).stop(timeout=5)
        time.sleep(1.5)
        done.set()
        loader.join()
        errors = sum(n for body, n in counts.items() if body.startswith("!"))
        reloaded = get_json(http_port, "/v1/health")["components"]["haproxy"]["reloads"] - reloads
        say(f"{sum(counts.values())} requests during the stop: {dict(sorted(counts.items()))}; "
            f"{errors} failed; HAProxy reloads: {reloaded}")
        say(f"now: {dict(spread(listen, 10))}")
        if not args.once:
            say(f"up until Ctrl-C; try: curl http://127.0.0.1:{listen}/ , "
                f"curl http://127.0.0.1:{http_port}/v1/services , "
                f"dig @127.0.0.1 -p {dns_port} web.service.discovery")
            while not stop:
                time.sleep(0.5)
                if not up.alive:
                    say(f"discovery up exited; its log:\n{up.log()[-3000:]}")
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        say("cleaning up: discovery up (and its private etcd), containers")
        if up is not None:
            up.terminate()
        remove_containers(client, started)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
