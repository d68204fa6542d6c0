"""Fixtures live in tests/harness: real etcd / ZooKeeper / dockerd / HAProxy on loopback."""

pytest_plugins = [
    "tests.harness.servers",
    "tests.harness.registries",
    "tests.harness.secure",
    "tests.harness.dockerd",
    "tests.harness.agent",
    "tests.harness.haproxy",
    "tests.harness.watcher",
]
