#!/usr/bin/env python3
"""`make demo`: a private etcd on loopback, three example containers, the agent,
`discovery services` once it has converged, then the watcher routing `web` through a local
HAProxy: requests spread over both instances, one instance stopped under continuous traffic,
and the errors counted (none expected). Stays up until Ctrl-C (or exits with --once), then
removes everything it started."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from discovery.registry import open_registry  # noqa: E402
from tests.harness.agent import AgentProcess  # noqa: E402
from tests.harness.dockerd import (  # noqa: E402
    app_healthcheck,
    build_example_image,
    remove_containers,
    run_app,
)
from tests.harness.servers import EtcdCluster  # noqa: E402
from tests.harness.util import free_port, wait_for  # noqa: E402
from tests.harness.watcher import WatcherProcess, spread  # noqa: E402


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def services_cli(url: str) -> str:
    out = subprocess.run([sys.executable, "-m", "discovery", "services", "--registry", url],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after showing the result")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="discovery-demo-"))
    client = docker.from_env()
    started: list[str] = []
    etcd = EtcdCluster(1, work / "etcd")
    agent: AgentProcess | None = None
    watcher: WatcherProcess | None = None
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        say("starting a private single-node etcd on loopback")
        etcd.start()
        url = etcd.url("/demo")
        say(f"registry: {url}")
        say("building the example app image (busybox httpd, cached)")
        image = build_example_image(client)
        specs = [("web-1", "web", "1"), ("web-2", "web", "1"), ("billing-1", "billing", "0")]
        ports: dict[str, int] = {}
        for name, service, healthy in specs:
            port = ports[name] = free_port()
            labels = {"discovery.service": service, "discovery.port": str(port),
                      "discovery.tags": "demo"}
            container = run_app(client, name=f"demo-{name}-{port}", port=port, labels=labels,
                                env={"HEALTHY": healthy}, healthcheck=app_healthcheck(),
                                image=image)
            started.append(str(container.id))
            state = "healthy" if healthy == "1" else "failing its health check"
            say(f"container {name}: service {service} on 127.0.0.1:{port} ({state})")
        say("starting the agent")
        agent = AgentProcess(url, "demo", work).start()

        def converged() -> bool:
            reg = open_registry(url)
            try:
                names = [i.service for i in reg.snapshot().instances.values()]
            finally:
                reg.close(revoke=False)
            return names.count("web") == 2

        t0 = time.monotonic()
        wait_for(converged, timeout=60, message="both web instances registered")
        say(f"converged in {time.monotonic() - t0:.2f}s; `discovery services --registry {url}`:")
        print(services_cli(url), flush=True)
        say("billing is not listed: its health check fails, so it is never registered")
        listen = free_port()
        say(f"starting the watcher: service web on 127.0.0.1:{listen} through a local HAProxy")
        watcher = WatcherProcess(url, {"web": listen}, work).start()
        watcher.wait_ready()
        wait_for(lambda: len(spread(listen, 4)) == 2, timeout=30, message="both web instances")
        say(f"20 requests to 127.0.0.1:{listen}: {dict(sorted(spread(listen, 20).items()))}")
        victim = next(name for name, _, _ in specs if name == "web-1")
        stopped = client.containers.get(f"demo-{victim}-{ports[victim]}")
        counts: Counter[str] = Counter()
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                counts.update(spread(listen, 1))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        reloads = watcher.reload_count()
        say("stopping web-1 (docker stop) while requests keep flowing")
        stopped.stop(timeout=5)
        time.sleep(1.5)
        done.set()
        loader.join()
        errors = sum(n for body, n in counts.items() if body.startswith("!"))
        say(f"{sum(counts.values())} requests during the stop: {dict(sorted(counts.items()))}; "
            f"{errors} failed; HAProxy reloads: {watcher.reload_count() - reloads}")
        say(f"now: {dict(spread(listen, 10))}")
        if not args.once:
            say(f"up until Ctrl-C; try: curl http://127.0.0.1:{listen}/ and the command above")
            while not stop:
                time.sleep(0.5)
                if not agent.alive:
                    say(f"the agent exited; its log:\n{agent.log()[-3000:]}")
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        say("cleaning up: watcher, agent, containers, etcd")
        if watcher is not None:
            watcher.terminate()
            watcher.cleanup()
        if agent is not None:
            agent.terminate()
        remove_containers(client, started)
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
