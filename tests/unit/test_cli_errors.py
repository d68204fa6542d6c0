"""Bad input to the one-shot commands is one line naming the culprit and exit 2, never a
traceback; what they print from the registry is printed as it is (review findings)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from discovery.cli.app import main
from discovery.cli.output import console
from discovery.errors import ConfigError, HAProxyError
from discovery.lookup.http import HttpApi
from discovery.model.catalog import Catalog
from discovery.watcher.assemble import HAProxySettings, assemble
from discovery.watcher.config import ServiceConfig, WatcherConfig
from discovery.watcher.supervisor import validate_config

NOWHERE = "etcd://127.0.0.1:9/p"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("value", ["nan", "1e400", "-1", "0"])
@pytest.mark.parametrize("command", ["services", "show"])
def test_a_timeout_that_is_no_timeout_is_a_usage_error(command: str, value: str) -> None:
    args = [command, "web"] if command == "show" else [command]
    code, out = run(*args, "--registry", NOWHERE, "--timeout", value)
    assert code == 2 and "--timeout" in out


def test_check_config_checks_the_agent_table_and_the_encoding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nttl = -3\n")
    code, out = run("check-config", "--config", str(bad))
    assert code == 2 and f"config file {bad}: [agent] ttl -3" in out
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[agent]\n")
    code, out = run("check-config", "--config", str(binary))
    assert code == 2 and str(binary) in out


def test_maint_names_its_own_flag() -> None:
    code, out = run("maint", "x", "on", "--agent", "bad")
    assert code == 2 and "--agent 'bad'" in out


def test_a_haproxy_that_cannot_run_and_a_reload_cmd_that_does_not_split(tmp_path: Path) -> None:
    with pytest.raises(HAProxyError, match="cannot run"):
        validate_config(str(tmp_path), tmp_path / "haproxy.cfg")  # a directory
    cfg = WatcherConfig(services={"web": ServiceConfig(name="web", port=18000)})
    settings = HAProxySettings(tmp_path, "haproxy", str(tmp_path / "admin.sock"),
                               str(tmp_path / "haproxy.cfg"), None, "'")
    with pytest.raises(ConfigError, match="--reload-cmd"):
        assemble(NOWHERE, cfg, settings)


def test_an_http_port_taken_is_a_config_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"http: cannot listen on 127.0.0.1 port {port}"):
            HttpApi(Catalog(), dict, None, "127.0.0.1", port).start()


def test_the_console_prints_values_as_they_are() -> None:
    out = console()
    with out.capture() as captured:
        out.print("n:abc:80 [/oops] see [red]docs[/red]")
    assert captured.get().strip() == "n:abc:80 [/oops] see [red]docs[/red]"


def test_a_dns_state_dir_that_cannot_be_used_is_a_usage_error(tmp_path: Path) -> None:
    """``discovery dns --state-dir`` asked for the last catalog there: a file in its place is
    one error naming it, before anything starts (not a warning every 30 s for ever)."""
    taken = tmp_path / "file"
    taken.write_text("")
    code, out = run("dns", "--registry", NOWHERE, "--state-dir", str(taken))
    assert code == 2 and f"--state-dir {taken}" in out
