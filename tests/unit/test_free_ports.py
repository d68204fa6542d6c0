"""Free ports: the package's ``free_ports`` gives distinct ones (``up --dev``'s client and peer
ports), and the harness's ``free_port`` never gives a test process the same port twice (the
kernel may hand out a port just closed again)."""

from __future__ import annotations

import socket

from discovery.registry.devserver import free_ports
from tests.harness.util import free_port


def test_ports_picked_together_are_distinct_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_the_harness_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == 300
