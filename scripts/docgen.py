"""What the generated pages share: the result files, the ``<!-- generated: NAME -->`` blocks
and the formatting of their tables.

A page's tables sit between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
:func:`render` rewrites what is between the markers from the results and leaves the prose
around them alone. ``scripts/gen_benchmarks.py`` writes every generated page with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

MARKER = re.compile(r"(<!-- generated: ([a-z0-9-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)

Result = dict[str, Any]
TIMES = "\N{MULTIPLICATION SIGN}"


def load(results: Path = RESULTS) -> dict[str, Result]:
    """Every result file by its stem (``<bench>-<backend>``)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


# ---- formatting ---------------------------------------------------------------------------


def num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 100:
            return f"{int(v):,}"
        return f"{v:,.{digits}f}"
    return str(v)


def verdict(v: Any) -> str:
    return {True: "**pass**", False: "**miss**", None: "—"}.get(v, str(v))


def table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def missing(*names: str) -> str:
    return f"_No result committed for {', '.join(f'`bench/results/{n}.json`' for n in names)}._"


def rows_of(res: Result | None, **match: Any) -> list[dict[str, Any]]:
    if res is None:
        return []
    return [r for r in res["summary"].get("rows", [])
            if all(r.get(k) == v for k, v in match.items())]


def fleet_rows(results: dict[str, Result], stem: str) -> dict[tuple[str, int], dict[str, Any]]:
    """bench/fleet.py: the rows of one result by (name, size)."""
    return {(r["name"], r["size"]): r for r in rows_of(results.get(stem))}


def mean(xs: Iterable[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


Tables = dict[str, Callable[[dict[str, Result]], str]]


def render(text: str, results: dict[str, Result], tables: Tables, page: str) -> str:
    """``text`` with every generated block rewritten; unknown names are an error."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in tables:
            raise SystemExit(f"{page}: unknown generated block {name!r} (known: "
                             f"{', '.join(tables)})")
        return f"{m.group(1)}{tables[name](results).rstrip()}\n{m.group(4)}"

    return MARKER.sub(repl, text)
