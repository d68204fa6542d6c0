"""The CLI as a user runs it (issue 8): a state dir that cannot be used is one line and exit 2;
``check-config`` with a hostile template runs nothing of it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.watcher.render import DEFAULT_TEMPLATE
from tests.harness.agent import REPO_ROOT
from tests.harness.util import free_port

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout, check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing directory nobody can create a file in (root ignores mode bits: procfs)."""
    if os.geteuid() == 0:
        yield Path(f"/proc/{os.getpid()}/fdinfo")
        return
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    yield d
    d.chmod(0o700)


def bad_state_dirs(tmp_path: Path, read_only: Path) -> list[Path]:
    file = tmp_path / "file"
    file.write_text("not a directory\n")
    return [file / "state",  # missing, cannot be created: under a regular file
            file,            # exists, not a directory
            read_only]       # exists, cannot be written


@pytest.mark.parametrize("command", ["watch", "up"])
def test_unusable_state_dir_is_one_line_exit_2(command: str, registry_url: str, tmp_path: Path,
                                               read_only_dir: Path) -> None:
    extra = ["--dns", "off", "--http", "off"] if command == "up" else []
    for state in bad_state_dirs(tmp_path, read_only_dir):
        out = cli(command, "--registry", registry_url, "--service", f"web:{free_port()}",
                  "--state-dir", str(state), *extra)
        assert out.returncode == 2, (state, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("discovery: ") and str(state) in lines[0], lines[0]
        assert "Traceback" not in out.stderr and "PermissionError" not in out.stderr


def test_state_dir_is_created_when_missing(registry_url: str, tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    out = cli("watch", "--registry", registry_url, "--service", f"web:{free_port()}",
              "--state-dir", str(state), "--once")
    assert out.returncode == 0, out.stderr
    assert (state / "haproxy.cfg").is_file()
    assert [p.name for p in state.iterdir()] == ["haproxy.cfg"]  # the probe file is gone


def test_check_config_runs_nothing_from_a_hostile_template(tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    template = tmp_path / "hostile.cfg.j2"
    template.write_text(DEFAULT_TEMPLATE.read_text() + "\n# {{ cycler.__init__.__globals__"
                        f".os.system('touch {marker}') }}}}\n")
    out = cli("check-config", "--template", str(template), "--service", f"web:{free_port()}")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(template) in lines[0] and "sandbox" in lines[0], out.stderr
    assert not marker.exists()
