"""Free ports: the package's ``free_ports`` gives distinct ones (``up --dev``'s client and peer
ports), and the harness's ``free_port`` never gives a test process the same port twice (the
kernel may hand out a port just closed again). ``up --dev`` picks its etcd's ports apart from
those it is about to bind itself (its DNS took the etcd's port once: "Address already in use")."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from discovery.registry import devserver
from discovery.registry.devserver import free_ports, listed_ports
from tests.harness.util import free_port


def test_ports_picked_together_are_distinct_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_the_harness_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == 300


def test_ports_the_caller_binds_itself_are_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    handed = iter([41000, 41001, 41002, 41003])  # what the kernel hands out, in turn

    class Sock:
        def __enter__(self) -> Sock:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: Any) -> None:
            self.port = next(handed)

        def getsockname(self) -> tuple[str, int]:
            return "127.0.0.1", self.port

    monkeypatch.setattr(devserver.socket, "socket", lambda *a: Sock())
    assert free_ports(2, avoid={41001}) == [41002, 41003]


def test_the_ports_up_is_given() -> None:
    given = ("127.0.0.1:8600", "[::1]:8500", "off", "web:9000", "api:127.0.0.2:9001",
             "db: 9002", "x:\u00b2")  # spaces as the options' own parsing strips them
    assert listed_ports(*given) == {8600, 8500, 9000, 9001, 9002}
