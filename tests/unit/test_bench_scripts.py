"""Every benchmark script still starts: its imports of the project hold after a refactor.

The benchmarks run outside ``make test``; without this a renamed function broke
``bench/reload_per_change.py`` unnoticed (``--help`` runs every import, and nothing else).
Also the exit status the benches share (``bench/common.py``): 2 when something was not
measured, else 1 when a row missed its target.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.util import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_bench_status_says_what_went_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # common.py puts bench/ on it: not after
    common = load_script(BENCH / "common.py")
    report = common.Report()
    assert report.status(0) == 0
    assert report.not_measured("etcd kill", RuntimeError("lost\nmore")) == 2
    assert report.unmeasured == ["etcd kill: lost"]
    assert "etcd kill: NOT MEASURED: lost" in capsys.readouterr().err
    report.emit({"name": "x", "pass": False})
    assert (report.status(0), report.status(2)) == (1, 2)
    work = tmp_path / "work"
    work.mkdir()
    common.keep_or_remove(work, True)
    assert work.exists()
    common.keep_or_remove(work, False)
    assert not work.exists()
