"""What one registry change costs one host's watcher, by catalog size: in-process, no server.

A watcher that serves DNS or HTTP follows the whole catalog, so at 10,000 hosts of 10
instances each host holds 100,000 instances and takes every change of the fleet. This times,
with an in-memory catalog of 1,000 / 10,000 / 100,000 instances (10 a service, loopback
addresses as ``bench/dns.py``'s zone), what one change makes it do:

- ``apply_us``: the catalog applying one put (a weight change), the wipe guard aside;
- ``dns_build_ms``: a DNS zone build from the zone before, after one change (what the server
  does, paced at 4x its time: the services changed since, ``discovery.lookup.dns_zone``);
  ``dns_build_cold_ms``: a build of every record (the first one);
- ``catalog_services_ms``: Consul's ``/v1/catalog/services`` answer (the listing and its JSON);
- ``services_answer_ms``: ``/v1/services``' whole-catalog answer after one change (kept by
  service, ``discovery.lookup.http_whole``); ``services_answer_whole_ms``: the same answer
  built from every instance (as every one was before, and a filtered one still is);
- ``json_out_write_ms``: ``--json-out``'s whole file written (its parts already serialised);
- ``outlier_read_ms``: one read of HAProxy's counters by outlier ejection with every service
  routed by zone and every instance tracked (the rows as ``show stat`` gives them).

Each figure is the median of ``--reps`` runs. Usage: ``.venv/bin/python bench/per_change.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import started, write_result
from dns_zone import zone

from discovery.files import write_atomic
from discovery.lookup.dns_zone import Zone
from discovery.lookup.http_guard import dump_json
from discovery.lookup.http_whole import WholeCatalog
from discovery.model.catalog import Catalog
from discovery.registry.base import Change, Snapshot
from discovery.watcher.json_out import catalog_json, service_json
from discovery.watcher.outlier import OutlierDetector, OutlierSettings

SIZES = (1_000, 10_000, 100_000)
PER_SERVICE = 10


def median_s(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def outlier_read(catalog: Catalog, reps: int) -> float:
    """One ``observe`` with every service asking and every instance's row, all tracked."""
    services = catalog.services()
    settings = dict.fromkeys(services, OutlierSettings())
    slots = {s: {f"s{i}": m.id for i, m in enumerate(members)} for s, members in services.items()}
    up = {s: {m.id for m in members} for s, members in services.items()}
    detector, count = OutlierDetector(clock=lambda: 100.0), [0]

    def read() -> None:
        count[0] += 1
        stat = {(s, slot): {"hrsp_2xx": str(count[0])} for s, mine in slots.items()
                for slot in mine}
        detector.observe(settings, stat, slots, up)

    read()  # every instance tracked from here on
    return median_s(read, reps)


def measure(size: int, reps: int) -> dict[str, Any]:
    records = zone(size // PER_SERVICE, PER_SERVICE)
    catalog = Catalog()
    catalog.load(Snapshot({i.key: i for i in records}, revision=1))
    one, weight = records[0], [100]

    def apply() -> None:
        weight[0] = 101 if weight[0] == 100 else 100
        catalog.apply(Change("put", one.key, replace(one, weight=weight[0]), revision=2))

    def dns_build() -> float:
        """A zone from the one before, each after one change (the change not timed)."""
        warned: set[tuple[str, ...]] = set()
        zone, times = Zone.from_catalog(catalog, warned), []
        for _ in range(reps * 4):
            apply()
            start = time.perf_counter()
            zone = Zone.from_catalog(catalog, warned, zone)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def services_answer() -> float:
        """The kept ``/v1/services`` answer, each after one change (the change not timed)."""
        kept, times = WholeCatalog(catalog), []
        kept.body()
        for _ in range(reps):
            apply()
            start = time.perf_counter()
            kept.body()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def services_answer_whole() -> None:
        data: dict[str, dict[str, list[Any]]] = {"services": {}}
        for inst in catalog.instances():
            data["services"].setdefault(inst.service, []).append(inst.to_dict())
        dump_json(data, False)

    parts = {name: service_json(members) for name, members in catalog.services().items()}
    with tempfile.TemporaryDirectory(prefix="per-change-") as tmp:
        out = Path(tmp) / "catalog.json"
        json_ms = median_s(lambda: write_atomic(out, catalog_json(parts), shared=True), reps)
        size_mb = out.stat().st_size / 2**20
    return {
        "instances": size, "services": size // PER_SERVICE,
        "apply_us": round(median_s(apply, reps * 20) * 1e6, 1),
        "dns_build_ms": round(dns_build() * 1e3, 2),
        "dns_build_cold_ms": round(median_s(lambda: Zone.from_catalog(catalog, set()),
                                            reps) * 1e3, 1),
        "catalog_services_ms": round(median_s(lambda: json.dumps(catalog.listing()),
                                              reps) * 1e3, 2),
        "services_answer_ms": round(services_answer() * 1e3, 2),
        "services_answer_whole_ms": round(median_s(services_answer_whole, reps) * 1e3, 1),
        "json_out_write_ms": round(json_ms * 1e3, 1), "json_out_mib": round(size_mb, 1),
        "outlier_read_ms": round(outlier_read(catalog, reps) * 1e3, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    start = started()
    rows = []
    for size in SIZES:
        rows.append(measure(size, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_save:
        path = write_result("per-change", "none", started_at=start,
                            summary={"reps": args.reps, "rows": rows}, samples=rows)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
