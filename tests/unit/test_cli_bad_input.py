"""Bad input to any command is one line naming the culprit (the flag, or the
file and key it came from), exit 2, no traceback; nothing fails later at run time instead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from discovery.agent.config import AgentConfig, merge, read_file
from discovery.cli.app import main
from discovery.errors import ConfigError, RenderError
from discovery.registry.url import RegistryURL
from discovery.watcher.core import Watcher
from discovery.watcher.render import Renderer

NOWHERE = "etcd://127.0.0.1:9/p"
BASE = AgentConfig(registry=NOWHERE, node="n1")


@pytest.fixture(autouse=True)
def _root_log_level() -> Iterator[None]:
    """``watch --once`` quiets the root logger (one-shot): give the next tests theirs back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def one_error(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("discovery: "), out
    return lines[0]


# 1. --docker: checked at start, not failing forever at run time

@pytest.mark.parametrize("url", ["foo://bar", "fd://3", "tcp://", "/var/run/docker.sock",
                                 "unix:///d.sock?x=1", "npipe:////./pipe/docker_engine"])
def test_a_docker_url_docker_py_cannot_use_is_refused_at_start(url: str) -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match="--docker"):
        replace(BASE, docker=url).validated()


@pytest.mark.parametrize("url", ["unix:///var/run/docker.sock", "unix://", "tcp://h:2375",
                                 "http://h:2375", "https://h:2376", "ssh://u@h",
                                 "http+unix:///d.sock"])
def test_the_docker_urls_docker_py_takes_pass(url: str) -> None:
    from dataclasses import replace

    assert replace(BASE, docker=url).validated().docker == url


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_agent_with_a_bad_docker_url_is_one_error_exit_2(tmp_path: Path, how: str) -> None:
    args = ["agent", "--registry", NOWHERE, "--node", "n1"]
    env = {"DISCOVERY_DOCKER": "foo://bar"} if how == "env" else {}
    config = tmp_path / "a.toml"
    config.write_text('[agent]\ndocker = "foo://bar"\n')
    args += {"flag": ["--docker", "foo://bar"], "env": [], "file": ["--config", str(config)]}[how]
    code, out = run(*args, env=env)
    line = one_error(out)
    assert code == 2 and "foo://bar" in line
    assert (f"config file {config}: [agent] docker" if how == "file" else "--docker") in line


# 5. check-config parses [agent] registry; unknown top-level tables are refused everywhere

def test_check_config_parses_the_agent_registry(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[agent]\nregistry = "http://x"\n')
    code, out = run("check-config", "--config", str(config))
    line = one_error(out)
    assert code == 2 and f"config file {config}: [agent] registry" in line and "http://x" in line


@pytest.mark.parametrize("command", ["check-config", "agent", "watch", "up"])
def test_a_misspelled_table_is_one_error_listing_the_known_ones(tmp_path: Path,
                                                                command: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[agnet]\nttl = 5\n[watcher]\n')
    args = [command, "--config", str(config)]
    if command in ("agent", "watch", "up"):
        args += ["--registry", NOWHERE]
    if command == "watch":
        args += ["--once", "--dry-run"]
    code, out = run(*args)
    line = one_error(out)
    assert code == 2 and "'agnet'" in line and str(config) in line
    assert "[agent], [watcher], [services.NAME]" in line


def test_a_file_with_the_known_tables_passes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[agent]\nttl = 5\n[agent.check]\ninterval = "5s"\n[watcher]\n'
                      '[services.web]\nport = 18000\n')
    assert merge(BASE, read_file(str(config)), set()).ttl == 5


# 7. a value from the file is blamed on the file and key, one from a flag on the flag

@pytest.mark.parametrize(("line", "key"), [
    ("ttl = nan", "ttl"), ("resync = inf", "resync"), ('zone = "A B"', "zone"),
    ('node = "x_y"', "node"), ('address = "1.2.3"', "address"), ('ttl = "10"', "ttl"),
    ('registry = "http://x"', "registry")])
def test_a_bad_file_value_names_the_file_and_key(tmp_path: Path, line: str, key: str) -> None:
    config = tmp_path / "a.toml"
    config.write_text(f"[agent]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        merge(BASE, read_file(str(config)), set())
    assert str(info.value).startswith(f"config file {config}: [agent] {key}")
    assert "--" not in str(info.value)


def test_a_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text("[agent]\nttl = 5\n")
    code, out = run("agent", "--registry", NOWHERE, "--node", "n1", "--resync", "nan",
                    "--config", str(config))
    assert code == 2 and one_error(out).startswith("discovery: --resync nan")
    config.write_text("[agent]\nttl = nan\n")
    code, out = run("agent", "--registry", NOWHERE, "--node", "n1", "--ttl", "nan",
                    "--config", str(config))  # the flag wins over the file, and is blamed
    assert code == 2 and one_error(out).startswith("discovery: --ttl nan")


# 2. registry URLs whose path has . or .. parts (kazoo: "relative paths not allowed")

@pytest.mark.parametrize("url", ["zk://127.0.0.1:9/../x", "zk://127.0.0.1:9/a/./b",
                                 "zk://127.0.0.1:9/a/..", "etcd://127.0.0.1:9/a/../b",
                                 "zk://127.0.0.1:9/p?format=nerve&path=/../{service}",
                                 "zk://127.0.0.1:9/p?format=nerve&path=/n/{service}/."])
def test_a_registry_path_with_dot_parts_is_refused_when_parsed(url: str) -> None:
    with pytest.raises(ConfigError, match="registry URL"):
        RegistryURL.parse(url)
    code, out = run("services", "--registry", url)
    assert code == 2 and "registry URL" in one_error(out)


def test_dots_inside_a_part_are_fine() -> None:
    assert RegistryURL.parse("zk://h/a.b/..c/x..").prefix == "/a.b/..c/x.."


# 3. --json-out: checked at start; a failed write while running is logged, not fatal

def test_json_out_that_cannot_be_written_is_one_error_at_start(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for target, reason in ((tmp_path, "is a directory"),
                           (afile / "x.json", "cannot write in its folder")):
        code, out = run("watch", "--registry", NOWHERE, "--once", "--service", "web:18000",
                        "--state-dir", str(tmp_path / "state"), "--json-out", str(target))
        line = one_error(out)
        assert code == 2 and f"--json-out {target}: {reason}" in line


def test_a_json_out_write_that_fails_while_running_is_logged_and_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.unit.test_json_out import whole
    from tests.unit.test_watcher_loop import _Registry

    target = tmp_path / "catalog.json"
    watcher = Watcher(_Registry(), None, json_out=target)  # type: ignore[arg-type]
    target.mkdir()  # gone bad after the start
    watcher.sync()
    assert watcher.json_out is not None and watcher.json_out.flush(10)  # written apart
    assert watcher.json_error and "--json-out" in watcher.json_error
    assert any("--json-out" in r.getMessage() for r in caplog.records)
    target.rmdir()
    watcher.sync()
    assert watcher.json_out.flush(10)
    assert watcher.json_error is None and target.read_text() == whole(watcher.catalog)


# 4. templates nested too deep: a RenderError naming the template, not a RecursionError

@pytest.mark.parametrize("text", ["{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}\n",
                                  "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000 + "\n"])
def test_a_template_nested_too_deep_is_a_render_error(tmp_path: Path, text: str) -> None:
    template = tmp_path / "deep.j2"
    template.write_text(text)
    with pytest.raises(RenderError, match=f"template {template}: too deeply nested"):
        Renderer(template)
    (tmp_path / "top.j2").write_text('{% include "deep.j2" %}\n')
    with pytest.raises(RenderError, match="too deeply nested"):
        Renderer(tmp_path / "top.j2").render({})
    code, out = run("check-config", "--service", "web:18000", "--template", str(template))
    assert code == 2 and str(template) in one_error(out)
    code, out = run("watch", "--registry", NOWHERE, "--once", "--service", "web:18000",
                    "--state-dir", str(tmp_path / "state"), "--template", str(template))
    assert code == 2 and str(template) in one_error(out)


# 6. the flags of an external HAProxy without --haproxy-socket

@pytest.mark.parametrize(("flag", "value"), [("--reload-cmd", 'a "b'),
                                             ("--master-socket", "/x/y"),
                                             ("--haproxy-config", "/x/y")])
def test_an_external_haproxy_flag_without_the_socket_is_an_error(tmp_path: Path, flag: str,
                                                                 value: str) -> None:
    code, out = run("watch", "--registry", NOWHERE, "--once", "--service", "web:18000",
                    "--state-dir", str(tmp_path), flag, value)
    assert code == 2 and f"{flag} needs --haproxy-socket" in one_error(out)


# 8. --haproxy-bin that is no HAProxy: blamed, not the staged config

@pytest.mark.parametrize("binary", ["/bin/false", "/bin/true", "/nonexistent/haproxy"])
def test_a_haproxy_bin_that_is_no_haproxy_is_named(tmp_path: Path, binary: str) -> None:
    code, out = run("watch", "--registry", NOWHERE, "--once", "--service", "web:18000",
                    "--state-dir", str(tmp_path), "--haproxy-bin", binary)
    line = one_error(out)
    assert code == 2 and f"--haproxy-bin '{binary}'" in line and ".tmp" not in line
    code, out = run("check-config", "--service", "web:18000", "--haproxy-bin", binary)
    assert code == 2 and f"--haproxy-bin '{binary}'" in one_error(out)


# 9. a SERVICE no service can be named

@pytest.mark.parametrize("command", ["show", "services"])
@pytest.mark.parametrize("name", ["BAD NAME", "../x", "", "a/b", "WEB"])
def test_show_of_a_name_no_service_has_is_exit_2(command: str, name: str) -> None:
    code, out = run(command, name, "--registry", NOWHERE)
    assert code == 2 and "SERVICE" in one_error(out)
