#!/usr/bin/python3 -I
"""HEALTHCHECK of the discovery image: GET /v1/health on the running command's HTTP API.

The address is the one the running `discovery` process was given (``--http ADDR:PORT``, read
from its command line in /proc, since the check runs as a separate ``docker exec``), else
``DISCOVERY_HEALTH_URL``, else ``DISCOVERY_HTTP`` / ``DISCOVERY_AGENT_HTTP``, else
``discovery up``'s default 127.0.0.1:8500. ``agent`` and ``watch`` serve HTTP only with
``--http``; without it (or with ``--http off``) the check can only see that the process is
alive. Exit 0 healthy, 1 unhealthy (the reason on stdout, shown by ``docker inspect``).
Standard library only: there is no curl in the image.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

COMMANDS = ("up", "agent", "watch", "dns")
UP_DEFAULT = "127.0.0.1:8500"


def find_process() -> tuple[int, list[str], dict[str, str]] | None:
    """(pid, args after the script, environ) of the running ``discovery`` command."""
    me = os.getpid()
    for entry in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        # /opt/discovery/bin/python3 /opt/discovery/bin/discovery <args>
        for i, arg in enumerate(argv[:2]):
            if arg.endswith("/bin/discovery"):
                environ: dict[str, str] = {}
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        for item in f.read().split(b"\0"):
                            key, _, value = item.decode(errors="replace").partition("=")
                            environ[key] = value
                except OSError:
                    pass
                return int(entry), argv[i + 1:], environ
    return None


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def health_url() -> str | None:
    if os.environ.get("DISCOVERY_HEALTH_URL"):
        return os.environ["DISCOVERY_HEALTH_URL"]
    found = find_process()
    if found is None:
        print("unhealthy: no discovery process running")
        sys.exit(1)
    _pid, args, environ = found
    command = next((a for a in args if a in COMMANDS), "")
    addr = option(args, "--http")
    if addr is None and command == "agent":
        addr = environ.get("DISCOVERY_AGENT_HTTP")
    if addr is None:
        addr = environ.get("DISCOVERY_HTTP") or (UP_DEFAULT if command == "up" else None)
    if addr is None or addr == "off":
        return None
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "*"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/health"


def main() -> int:
    url = health_url()
    if url is None:
        print("alive (no HTTP API: give --http ADDR:PORT for a real health check)")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=2.5) as resp:
            body = resp.read().decode(errors="replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(errors="replace"), exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    try:
        summary = json.dumps(json.loads(body), separators=(",", ":"))[:800]
    except ValueError:
        summary = body[:800]
    print(f"{status} {url} {summary}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
