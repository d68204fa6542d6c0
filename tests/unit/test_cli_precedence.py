"""Flags and environment over the configuration file over the defaults, in ``agent`` and
``up`` alike (:func:`discovery.cli.options.given`, :func:`discovery.cli.up.configs`)."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from discovery.agent.config import AgentConfig
from discovery.cli.options import given, host_options
from discovery.cli.up import configs

NAMES = ("node", "address", "docker", "ttl", "resync")


def explicit_of(args: list[str], env: dict[str, str]) -> set[str]:
    seen: list[set[str]] = []

    @click.command()
    @host_options()
    @click.pass_context
    def cmd(ctx: click.Context, **_: object) -> None:
        seen.append(given(ctx, NAMES))

    result = CliRunner().invoke(cmd, args, env=env)
    assert result.exit_code == 0, result.output
    assert len(seen) == 1
    return seen[0]


def test_given_counts_flags_and_environment_not_defaults() -> None:
    assert explicit_of([], {}) == set()
    assert explicit_of(["--node", "h1", "--ttl", "20"], {"DISCOVERY_RESYNC": "60"}) == {
        "node", "ttl", "resync"}
    assert explicit_of(["--address=127.0.0.2"], {"DISCOVERY_DOCKER": "unix:///d.sock"}) == {
        "address", "docker"}


def test_up_takes_the_file_only_for_what_was_not_given(tmp_path: Path) -> None:
    config = tmp_path / "up.toml"
    config.write_text('[agent]\nnode = "filenode"\naddress = "127.0.0.9"\nttl = 30\n'
                      'resync = 90\ndocker = "unix:///file.sock"\n')
    base = AgentConfig(registry="etcd://127.0.0.1:9/p", node="flagnode", address="127.0.0.2",
                       ttl=12.0, resync=40.0)
    agent, _ = configs(base, None, (), str(config), {"registry", "node", "ttl"})
    assert (agent.node, agent.ttl) == ("flagnode", 12.0)  # given: the flags win
    assert (agent.address, agent.resync, agent.docker) == ("127.0.0.9", 90.0,
                                                           "unix:///file.sock")
    agent, _ = configs(base, None, (), str(config), {"registry", *NAMES})
    assert (agent.node, agent.address, agent.ttl, agent.resync) == (
        "flagnode", "127.0.0.2", 12.0, 40.0)
    assert agent.docker is None  # named as given: the value passed (None) stands


def test_a_component_of_up_that_dies_is_named_for_the_exit_status() -> None:
    """``up`` runs agent and watcher through _guard: one that raises stops the process
    (``done``) and is named in ``failed``, which makes ``up`` exit 1, not 0."""
    import threading

    from discovery.cli.up import _guard

    class Agent:
        def run(self) -> None:
            raise RuntimeError("boom")

    done, failed = threading.Event(), list[str]()
    _guard("agent", Agent().run, done, failed)()
    assert done.is_set() and failed == ["agent"]
    done.clear()
    _guard("watcher", lambda: None, done, failed)()  # a clean end stops too, and fails nothing
    assert done.is_set() and len(failed) == 1
