"""``--zone`` of ``agent``, ``watch`` and ``up``: one option, checked before anything starts;
``up`` hands it to both its agent and its watcher."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from discovery.agent.config import AgentConfig
from discovery.cli.app import main
from discovery.cli.up import configs

# an address nothing listens on: a command that got past its options would fail differently
NOWHERE = "etcd://127.0.0.1:9/p"


@pytest.mark.parametrize("command", ["up", "agent", "watch"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_bad_zone_is_one_error_naming_the_option(command: str, how: str) -> None:
    args = [command, "--registry", NOWHERE, "--service", "web:18000"]
    args = args[:3] if command == "agent" else args
    env = {"DISCOVERY_ZONE": "Eu_1"} if how == "env" else {}
    if how == "flag":
        args += ["--zone", "Eu_1"]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert "'--zone'" in result.output and "'Eu_1' is not a DNS label" in result.output
    assert "Traceback" not in result.output and "unreachable" not in result.output


def test_up_gives_its_zone_to_the_agent_and_the_watcher(tmp_path: Path) -> None:
    base = AgentConfig(registry=NOWHERE, node="h1")
    agent, watcher = configs(base, "eu-1", ("web:18000",), None)
    assert (agent.zone, watcher.zone) == ("eu-1", "eu-1")
    assert list(watcher.services) == ["web"]
    agent, watcher = configs(base, None, (), None)
    assert (agent.zone, watcher.zone) == ("", "")


def test_up_zone_flag_beats_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "up.toml"
    config.write_text('[agent]\nzone = "file-a"\n[watcher]\nzone = "file-w"\n'
                      '[services.web]\nport = 18000\n')
    base = AgentConfig(registry=NOWHERE, node="h1")
    agent, watcher = configs(base, None, (), str(config))
    assert (agent.zone, watcher.zone) == ("file-a", "file-w")
    agent, watcher = configs(base, "eu-1", (), str(config))
    assert (agent.zone, watcher.zone) == ("eu-1", "eu-1")
    assert list(watcher.services) == ["web"]
