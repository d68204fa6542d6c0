"""Free ports: the package's ``free_ports`` gives distinct ones (``up --dev``'s client and peer
ports), and the harness's ``free_port`` never gives a test process the same port twice (the
kernel may hand out a port just closed again). ``up --dev`` picks its etcd's ports apart from
those it is about to bind itself (its DNS took the etcd's port once: "Address already in use")."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from discovery.cli.app import main
from discovery.errors import ConfigError
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


def test_up_dev_keeps_the_config_files_listeners_apart_too(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The config file's service and stats ports are read before the dev etcd picks its own
    (they were read after it: the kernel could hand the etcd one of them)."""
    config = tmp_path / "up.toml"
    config.write_text("[watcher]\nstats_port = 18404\n[services.web]\nport = 18000\n")
    avoided: list[set[int]] = []

    class Etcd:  # records what it is asked to avoid, and stops `up` there
        def __init__(self, avoid: set[int]) -> None:
            avoided.append(set(avoid))
            raise ConfigError("the dev etcd would start here")

    monkeypatch.setattr(devserver, "LocalEtcd", Etcd)
    args = ["up", "--dev", "--config", str(config), "--service", "api:18001",
            "--dns", "127.0.0.1:18600", "--http", "127.0.0.1:18500"]
    result = CliRunner().invoke(main, args, env={"DISCOVERY_REGISTRY": ""})
    assert "the dev etcd would start here" in result.output, result.output
    assert avoided == [{18600, 18500, 18000, 18001, 18404}]
