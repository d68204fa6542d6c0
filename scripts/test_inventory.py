#!/usr/bin/env python3
"""How many tests the suite runs, and what they need: in-process, or a real dockerd, etcd,
ZooKeeper or HAProxy (docs/testing.md quotes this). Collects only; runs nothing.

    .venv/bin/python scripts/test_inventory.py

An integration test counts for a component when one of its fixtures starts it, its parameters
name it (``registry_url[etcd]``), or its own code does (a ``discovery up --dev`` runs its own
etcd; every ``discovery watch``/``up`` its own HAProxy): see COMPONENTS. The counts overlap.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: component -> (fixtures that start it, a pattern for the test's id and source)
COMPONENTS = {
    "dockerd": ({"docker_client", "containers", "example_image", "sidecar_image"},
                r"docker|container"),
    "etcd": ({"etcd_single", "etcd_cluster3"},
             r"\[etcd|etcd://|EtcdCluster|--dev|(Rbac|Jwt|Auth|Tls)Etcd\b"),
    "ZooKeeper": ({"zk_single", "zk_ensemble3", "zk_bitset_watches"}, r"\[zk|zk://|ZkEnsemble"),
    "HAProxy": ({"haproxy_factory", "start_watcher"}, r"haproxy|\"watch\"|\"up\""),
}


class Inventory:
    def __init__(self) -> None:
        self.items: list[pytest.Item] = []

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.items = list(items)


def text_of(item: pytest.Item) -> str:
    func = getattr(item, "function", None)
    try:
        return item.name + (inspect.getsource(func) if func is not None else "")
    except (OSError, TypeError):
        return item.name


def main() -> int:
    inv = Inventory()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
                       plugins=[inv])
    if code not in (0, 5):
        return int(code)
    unit = [i for i in inv.items if "tests/unit/" in str(i.path)]
    integration = [i for i in inv.items if "tests/integration/" in str(i.path)]
    print(f"\n{len(inv.items)} tests: {len(unit)} unit (in-process), "
          f"{len(integration)} integration (real components)")
    for name, (fixtures, pattern) in COMPONENTS.items():
        n = sum(1 for i in integration
                if fixtures & set(getattr(i, "fixturenames", ()))
                or re.search(pattern, text_of(i)))
        print(f"  integration tests using a real {name}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
