"""What one registry client has read: bytes, keys, and how many full and per-node reads.

Every backend counts what the registry *returned* to it (keys + values on etcd, paths + data
on ZooKeeper) in one :class:`ReadStats`. /metrics serves the bytes as
``discovery_registry_read_bytes_total``; tests use the counts to prove what a read cost (an
agent's reconcile reads its own node's entries, whatever the size of the fleet) and that a
reconnect resumed a watch without reading everything again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadCounts:
    """A copy of the counters at one moment; subtract two to get what happened between."""

    bytes: int = 0
    keys: int = 0
    full_reads: int = 0  # snapshots (whole registry, or every watched service)
    node_reads: int = 0  # node_snapshot (one node's entries)

    def __sub__(self, other: ReadCounts) -> ReadCounts:
        return ReadCounts(self.bytes - other.bytes, self.keys - other.keys,
                          self.full_reads - other.full_reads, self.node_reads - other.node_reads)


class ReadStats:
    """Thread-safe counters of one registry client's reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = self._keys = self._full = self._node = 0

    def add(self, key: bytes | str, value: bytes | None) -> None:
        """One key (and its value, if any) came back from the registry."""
        size = len(key) + (len(value) if value else 0)
        with self._lock:
            self._bytes += size
            self._keys += 1

    def listed(self, names: Iterable[bytes | str]) -> None:
        """A listing came back: these names, without values."""
        names = list(names)
        with self._lock:
            self._bytes += sum(len(n) for n in names)
            self._keys += len(names)

    def full_read(self) -> None:
        with self._lock:
            self._full += 1

    def node_read(self) -> None:
        with self._lock:
            self._node += 1

    @property
    def bytes(self) -> int:
        return self._bytes

    def counts(self) -> ReadCounts:
        with self._lock:
            return ReadCounts(self._bytes, self._keys, self._full, self._node)
