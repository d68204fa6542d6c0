#!/usr/bin/env python3
"""A registry-side wipe at fleet size, through one host's real watcher: how many services it
empties, with the wipe guard and without it, side by side in one run.

The project's ``Watcher`` (wipe guard, catalog; no router) follows a registry that stands in
for etcd (this bench measures the watcher, not a registry): it loads ``--services`` x 10
instances, then gets the wipe as etcd would send it, from one thread (etcd's watch loop):

- ``prefix``: the services prefix deleted at once (one ``DeleteRange``): every delete, in key
  order, back to back;
- ``leases``: every host's lease revoked (a stuck leader, etcd #15247) as etcd's lessor does it,
  at most 1,000 leases a second (500 every 0.5 s), each host holding 10 instances of 10
  services and each service 10 instances on 10 hosts; the agents do not come back;
- ``beside``: the same prefix delete of every service but one, ``big``, which holds twice as
  many instances as all the others and stays (the hosts of every other service lost, a large
  batch fleet left): a third of the catalog goes, but 100 % of the other services.

Measured per row: how long the watcher took to take the deletes, and the services with no
instance left in the catalog (what HAProxy, DNS and HTTP serve) sampled every 0.1 s until 1 s
after the last delete: the most at once; and those left short, under half of their instances
serving (before a wipe was seen, each delete that left its service another instance was
applied: the services first in the key order went down to one). Target (the guard's promise):
no service emptied.

Raw result: ``bench/results/wipe-guard-none.json``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, measured, say

from discovery.model import Instance
from discovery.registry import Change, Snapshot
from discovery.registry.base import read_first
from discovery.registry.reads import ReadStats
from discovery.watcher.core import Watcher
from discovery.watcher.guard import GuardSettings

PER_SERVICE = 10
LEASES_A_TICK, TICK = 500, 0.5  # etcd 3.4's lessor: leaseRevokeRate 1,000/s, every 0.5 s


class Registry:
    """What the watcher needs of a registry: a snapshot, and one watch it is handed."""

    url = None
    invalid_records = 0

    def __init__(self, instances: dict[tuple[str, str], Instance]) -> None:
        self.instances, self.reads = instances, ReadStats()
        self.callback: Callable[[Change], None] | None = None

    def snapshot(self, services: Any = None) -> Snapshot:
        return Snapshot(instances=dict(self.instances), revision=1)

    def watch(self, callback: Callable[[Change], None], start_revision: int = 0,
              services: Any = None) -> Any:
        read_first(start_revision, self.snapshot, callback)  # the watcher starts FIRST_READ
        self.callback = callback
        return self

    def stop(self) -> None:
        pass

    def add_state_listener(self, callback: Any) -> None:
        pass

    def close(self, revoke: bool = True) -> None:
        pass


def fleet(services: int, seed: int = 1) -> tuple[dict[Any, Instance], list[list[Instance]]]:
    """``services`` x 10 instances; and hosts of 10 instances, each service's 10 on 10 hosts."""
    rng = random.Random(seed)
    slots = [(s, k) for s in range(services) for k in range(PER_SERVICE)]
    rng.shuffle(slots)
    hosts: list[list[Instance]] = []
    for h in range(services):
        hosts.append([Instance(service=f"svc{s:05d}", id=f"h{h}:{k:012x}:80", node=f"h{h}",
                               address="127.0.0.1", port=8000 + k)
                      for s, k in slots[h * PER_SERVICE:(h + 1) * PER_SERVICE]])
    return {i.key: i for host in hosts for i in host}, hosts


def one(scenario: str, services: int, guard: bool, report: Report) -> dict[str, Any]:
    instances, hosts = fleet(services)
    wiped = sorted(instances)
    if scenario == "beside":  # one service of twice the others' instances, left as it is
        big = [Instance(service="big", id=f"b{n}:{n:012x}:80", node=f"b{n}",
                        address="127.0.0.1", port=8000) for n in range(2 * len(instances))]
        instances = {**instances, **{i.key: i for i in big}}
    registry = Registry(instances)
    watcher = Watcher(registry, None, guard=GuardSettings(enabled=guard))  # type: ignore[arg-type]
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    if not watcher.wait_ready(60) or registry.callback is None:
        raise RuntimeError("the watcher did not start")
    names = {key[0] for key in wiped}
    worst, short, done = [0], [0], threading.Event()

    def sample() -> None:  # services emptied; left short (under half of their instances)
        while not done.is_set():
            counts = [watcher.catalog.serving_count(s) for s in names]
            worst[0] = max(worst[0], sum(1 for c in counts if not c))
            short[0] = max(short[0], sum(1 for c in counts if c < PER_SERVICE / 2))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if scenario in ("prefix", "beside"):
        for key in wiped:
            registry.callback(Change("delete", key=key, revision=2))
    else:
        for tick, first in enumerate(range(0, len(hosts), LEASES_A_TICK)):
            wait = start + tick * TICK - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            for host in hosts[first:first + LEASES_A_TICK]:
                for inst in host:
                    registry.callback(Change("delete", key=inst.key, revision=2 + tick))
    took = time.perf_counter() - start
    time.sleep(1.0)
    done.set()
    sampler.join()
    empty_end = sum(1 for s in names if not watcher.catalog.serving_count(s))
    short_end = sum(1 for s in names if watcher.catalog.serving_count(s) < PER_SERVICE / 2)
    watcher.stop()
    thread.join(10)
    return report.emit({
        "scenario": scenario, "guard": "on" if guard else "off", "services": services,
        "instances": len(instances), "deleted": len(wiped), "deletes_taken_s": round(took, 2),
        "empty_services_most": max(worst[0], empty_end), "empty_services_end": empty_end,
        "short_services_most": max(short[0], short_end), "short_services_end": short_end,
        "held_end": watcher.guard.status.holding, "engaged": watcher.guard.status.engaged,
        "target": "no service emptied" if guard else None,
        "pass": (max(worst[0], empty_end) == 0) if guard else None})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,10000", help="services (x 10 instances)")
    ap.add_argument("--scenarios", default="prefix,leases,beside")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # a wipe of 100,000 is many lines; the rows say it

    def run(work: Path, report: Report) -> list[dict[str, Any]]:
        rows = []
        for scenario in args.scenarios.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                for guard in (False, True):
                    say(f"{scenario}, {size} services, guard {'on' if guard else 'off'}")
                    rows.append(one(scenario, size, guard, report))
        return rows

    return measured("wipe-guard", "none", "the wipe", run, save=not args.no_save)


if __name__ == "__main__":
    sys.exit(main())
