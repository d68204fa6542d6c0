"""docs/benchmarks.md's tables, docs/operations.md's sizing and the README's fleet summary are
generated from bench/results/*.json and must match them.

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
        "a generated page is out of date; regenerate it with\n"
        "    .venv/bin/python scripts/gen_benchmarks.py\n" + out.stderr[-4000:])


def test_every_result_file_is_complete() -> None:
    paths = sorted(RESULTS.glob("*.json"))
    assert len(paths) >= 10, f"bench results missing from {RESULTS}"
    for path in paths:
        doc = json.loads(path.read_text())
        for key in ("bench", "backend", "command", "machine", "started_utc", "summary",
                    "samples"):
            assert key in doc, f"{path.name}: no {key!r}"
        assert path.stem == f"{doc['bench']}-{doc['backend']}", path.name
        assert "loadavg_at_start" in doc["machine"], path.name


def test_every_generated_block_has_a_known_name(gen: ModuleType) -> None:
    assert DOC in gen.PAGES
    for page, tables in gen.PAGES.items():
        names = [m.group(2) for m in gen.MARKER.finditer(page.read_text())]
        assert names, f"no generated block in {page}"
        assert set(names) <= set(tables), (page, set(names) - set(tables))


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


def _fleet_rows(size: int, rss: float, requests: float) -> list[dict[str, object]]:
    return [
        {"name": "fleet_steady", "size": size, "backend": "etcd", "connections": size,
         "requests_per_s_per_host": requests,
         "requests_by_method_per_s_per_host": {"LeaseKeepAlive": 0.3},
         "client_sent_bytes_per_s_per_host": {"p50": 50.0},
         "client_received_bytes_per_s_per_host": {"p50": 200.0},
         "reads_bytes_per_s_per_host_mean": 100.0, "server_rss_mib": [rss, rss, rss],
         "server": {"etcd_mvcc_db_total_size_in_use_in_bytes": 3 * 700.0 * 10 * size,
                    "etcd_debugging_mvcc_watcher_total": 5.0 * size}},
        {"name": "fleet_change", "size": size, "received_bytes_per_change_per_host": 500.0,
         "p99_ms": 100.0},
    ]


def test_the_sizing_is_the_measured_per_host_figures_times_the_hosts(gen: ModuleType) -> None:
    """scripts/sizing.py's method: flat per-host figures x hosts, memory on the fitted line."""
    fake = {"fleet-etcd": {"command": "bench/fleet.py --backends etcd --resync 20",
                           "machine": {"commit": "abcdef0123"},
                           "summary": {"rows": _fleet_rows(250, 100.0, 0.36)
                                       + _fleet_rows(500, 150.0, 0.38)}}}
    text = "<!-- generated: sizing-measured -->\n<!-- end generated -->\n" \
           "<!-- generated: sizing -->\n<!-- end generated -->\n"
    out = gen.render_page(text, fake, gen.sizing.TABLES, "operations.md")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()}
    assert "| 0.360 | 0.380 |" in rows["requests/s, steady"]
    assert "2.00 KB" in rows["bytes read a resync (the node's own instances)"]  # 100 B/s x 20 s
    assert "etcd 37/s | etcd 370/s | etcd 3,700/s" in rows["steady requests, all hosts"]
    # 50 + 0.2 MiB a host: 70 / 250 / 2,050 MiB
    assert "etcd ~70 MiB | etcd ~250 MiB | etcd ~2,050 MiB" in rows[
        "member memory (the fitted line, MiB: etcd 50 + 0.200 a host)"]
    assert "etcd ~7.0 MB" in rows["registry data, a member"]  # 0.7 KB x 10 x 1,000
    assert "etcd ~5.0 MB" in rows["bytes sent for one change, every host following"]
    assert "etcd at `abcdef0`" in out
    assert "No result committed" in gen.render_page(text, {}, gen.sizing.TABLES, "x")


def test_the_readme_summary_marks_what_its_row_says_missed(gen: ModuleType) -> None:
    """A restart row that failed on something the cell does not show (its catalogs, say) is a
    miss too; a size the run never reached shows as a dash, a missing file by its name."""
    rows = [{"name": "fleet_restart", "size": 250, "resync_max_ms": 2500.0,
             "peak_over_steady": 2.0, "pass": False, "target": "every host within 10 s"},
            {"name": "fleet_change", "size": 250, "p99_ms": 40.0, "pass": True,
             "target": "p99 <= 250 ms"},
            {"name": "fleet_change", "size": 500, "p99_ms": 260.0, "pass": False}]
    fake = {"fleet-zk": {"summary": {"rows": rows}}, "fleet-etcd": {"summary": {"rows": []}}}
    out = gen.t_fleet_summary(fake)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()}
    change = lines["one change on every host: p99 (target: p99 <= 250 ms)"]
    assert change.endswith("| — / — / — | no `fleet-proxy-etcd.json` "
                           "| 40 ms / **260 ms (miss)** / — | no `fleet-spread6-zk.json` |")
    restart = next(v for k, v in lines.items() if k.startswith("full restart"))
    assert "**2.5 s, 2.0\N{MULTIPLICATION SIGN} (miss)** / — / —" in restart
    assert "No result committed" in gen.t_fleet_summary({})
