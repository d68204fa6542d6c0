"""discovery.agent.config: the ``[agent]`` table of a config file, type-checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery.agent.config import AgentConfig, merge, read_file
from discovery.errors import ConfigError

BASE = AgentConfig(registry="etcd://127.0.0.1:2379/p", node="n1")


@pytest.mark.parametrize(("line", "reason"), [
    ('internal = "false"', "internal must be true or false, not 'false'"),  # a truthy string
    ("internal = 0", "internal must be true or false"),
    ('ttl = "10"', "ttl must be a number"),
    ("resync = true", "resync must be a number"),
    ("node = 5", "node must be a string"),
    ("zone = false", "zone must be a string"),
    ("docker = 1", "docker must be a string"),
])
def test_a_value_of_the_wrong_type_is_one_error_naming_the_key(
        tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[agent]\n{line}\n")
    with pytest.raises(ConfigError, match=reason):
        merge(BASE, read_file(str(path)), set())


def test_values_of_the_right_type_apply(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ninternal = true\nttl = 5\nresync = 2.5\nzone = "z1"\n'
                    'docker = "unix:///run/docker.sock"\n[agent.check]\ninterval = "5s"\n')
    config = merge(BASE, read_file(str(path)), set())
    assert (config.internal, config.ttl, config.resync, config.zone) == (True, 5, 2.5, "z1")
    assert config.docker == "unix:///run/docker.sock" and config.check.interval == 5


def test_a_setting_given_explicitly_is_not_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ninternal = "yes"\n')
    assert merge(BASE, read_file(str(path)), {"internal"}).internal is False
