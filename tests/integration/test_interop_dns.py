"""Names resolve through a resolver people run: dnsmasq forwarding ``discovery.`` to us.

A real dnsmasq (started here on loopback, its own pid, killed by it) is configured as
docs/dns.md says (``server=/discovery/127.0.0.1#PORT``) and asked with ``dig``, A and SRV.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from discovery.lookup.dns import DnsServer
from discovery.model import Instance, State
from discovery.model.catalog import Catalog
from discovery.registry.base import Snapshot
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
DIG = shutil.which("dig") or "/usr/bin/dig"


def inst(n: int, **kw: object) -> Instance:
    return Instance(service="web", id=f"node{n}:{n:012x}:8080", node=f"node{n}",
                    address=f"192.0.2.{n}", port=8000 + n, **kw)  # type: ignore[arg-type]


@pytest.fixture
def dnsmasq() -> Iterator[tuple[int, DnsServer]]:
    cat = Catalog()
    members = [inst(1), inst(2), inst(3, state=State.DRAINING)]
    cat.load(Snapshot({i.key: i for i in members}))
    with DnsServer(cat, port=0, domain="discovery.", ttl=0) as ours:
        port = free_port()
        proc = subprocess.Popen(
            [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", f"--port={port}",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
             "--pid-file", "--cache-size=0", f"--server=/discovery/127.0.0.1#{ours.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: proc.poll() is None and dig(port, "web.service.discovery", "A"),
                     15, interval=0.1, message="dnsmasq answering")
            yield port, ours
        finally:
            proc.kill()
            out = proc.communicate(timeout=10)[0]
            print(f"----- dnsmasq -----\n{out.decode(errors='replace')[-3000:]}")


def dig(port: int, name: str, qtype: str) -> list[str]:
    out = subprocess.run([DIG, "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", "+short",
                          name, qtype], capture_output=True, text=True, timeout=15, check=True)
    return sorted(out.stdout.split("\n")[:-1])


def test_a_and_srv_through_dnsmasq(dnsmasq: tuple[int, DnsServer]) -> None:
    port, _server = dnsmasq
    assert dig(port, "web.service.discovery", "A") == ["192.0.2.1", "192.0.2.2"]  # up only
    assert dig(port, "web.service.discovery", "SRV") == [
        "1 100 8001 node1.node.discovery.", "1 100 8002 node2.node.discovery."]
    assert dig(port, "node1.node.discovery", "A") == ["192.0.2.1"]
    assert dig(port, "nope.service.discovery", "A") == []
