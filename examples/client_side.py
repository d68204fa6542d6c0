#!/usr/bin/env python3
"""Client-side discovery without HAProxy: watch a service, send requests round-robin.

    .venv/bin/python examples/client_side.py --registry etcd://127.0.0.1:2379/discovery \\
        --service web --path / --interval 1

The instance list is kept current by ``Client.watch`` (the callback gets the full list of
healthy instances at once and after every change); each request goes to the next one. Stop
and start containers while it runs: requests follow the registry within a moment, and a
draining (stopping) instance gets no new requests. For weighted random choice instead of
round-robin, use ``client.pick(service)``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import urllib.error
import urllib.request

from discovery import Client
from discovery.errors import DiscoveryError
from discovery.model import Instance

log = logging.getLogger(__name__)


class RoundRobin:
    """The service's current instances, updated by the watch callback; ``next()`` cycles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: list[Instance] = []
        self._turn = 0
        self.ready = threading.Event()  # set by the first callback (the initial list)

    def update(self, instances: list[Instance]) -> None:  # the watch callback
        with self._lock:
            self._instances = instances
        self.ready.set()
        shown = ", ".join(f"{i.address}:{i.port}" for i in instances) or "none"
        print(f"# instances now: {shown}", flush=True)

    def next(self) -> Instance | None:
        with self._lock:
            if not self._instances:
                return None
            self._turn = (self._turn + 1) % len(self._instances)
            return self._instances[self._turn]


def request(instance: Instance, path: str, timeout: float) -> str:
    url = f"http://{instance.address}:{instance.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(200).decode(errors="replace").strip()
            return f"{url} -> {resp.status} {body}"
    except urllib.error.HTTPError as exc:
        return f"{url} -> {exc.code}"
    except OSError as exc:  # refused, timed out: a real client would retry another instance
        return f"{url} -> failed: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="etcd://host:port/prefix or zk://...")
    parser.add_argument("--service", required=True, help="service name to call")
    parser.add_argument("--tag", help="only instances with this tag")
    parser.add_argument("--path", default="/", help="HTTP path to GET (default /)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between requests")
    parser.add_argument("--count", type=int, default=0, help="stop after N requests (0: never)")
    parser.add_argument("--timeout", type=float, default=2.0, help="request and registry timeout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    pool = RoundRobin()
    try:
        with Client(args.registry, timeout=args.timeout) as client:
            client.watch(args.service, pool.update, tag=args.tag)
            pool.ready.wait(args.timeout)
            sent = 0
            while not args.count or sent < args.count:
                instance = pool.next()
                if instance is None:
                    print(f"no healthy instance of {args.service}", flush=True)
                else:
                    print(request(instance, args.path, args.timeout), flush=True)
                    sent += 1
                time.sleep(args.interval)
    except DiscoveryError as exc:  # bad URL, registry unreachable at the start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
