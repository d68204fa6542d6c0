"""docs/benchmarks.md's tables are generated from bench/results/*.json and must match them.

A new or re-run result without a regenerated page fails here. Fix:

    .venv/bin/python scripts/gen_benchmarks.py
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_benchmarks.py"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/gen_benchmarks.py, imported by name from scripts/."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(SCRIPT.stem)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_the_page_is_up_to_date() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0, (
        "docs/benchmarks.md is out of date; regenerate it with\n"
        "    .venv/bin/python scripts/gen_benchmarks.py\n" + out.stderr[-4000:])


def test_every_result_file_is_complete() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        for key in ("bench", "backend", "command", "machine", "started_utc", "summary",
                    "samples"):
            assert key in doc, f"{path.name}: no {key!r}"
        assert path.stem == f"{doc['bench']}-{doc['backend']}", path.name
        assert "loadavg_at_start" in doc["machine"], path.name


def test_every_generated_block_has_a_known_name(gen: ModuleType) -> None:
    names = [m.group(2) for m in gen.MARKER.finditer(DOC.read_text())]
    assert names, "no generated block in docs/benchmarks.md"
    assert set(names) <= set(gen.TABLES), set(names) - set(gen.TABLES)


def test_a_changed_result_makes_the_page_stale(gen: ModuleType, tmp_path: Path) -> None:
    text = "<!-- generated: dns -->\nold\n<!-- end generated -->\n"
    fake = {"dns-none": {"summary": {"rows": [{
        "workload": "hot", "qtype": "A", "query_names": 50, "changes_per_s": 0,
        "discovery_qps": 1000, "dnsmasq_qps": 2000, "discovery_rounds": [1000],
        "dnsmasq_rounds": [2000], "ratio": 0.5, "worst_ratio": 0.5, "lost": [0, 0],
        "correct": True, "additional_correct": [True, True], "cpu_us_per_query": "1+1"}]}}}
    new = gen.render(text, fake)
    assert "old" not in new and "| hot | A | 50 |" in new
    assert gen.render(new, fake) == new  # idempotent
    assert "No result committed" in gen.render(text, {})
