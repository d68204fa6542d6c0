"""The TTL a registry grants against the ``--ttl`` asked for, told once a value.

Neither backend has to grant what a host asks for: etcd raises a lease's TTL to its shortest
(1.5 election timeouts, rounded up to the second: 2 s by default), and a ZooKeeper member
clamps a session timeout to its ``[minSessionTimeout, maxSessionTimeout]``. A dead host's
instances then leave after the granted time, not after ``--ttl``, and nothing said so.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
#: what each backend's warning advises
ETCD_SHORTEST = "etcd's shortest lease is 1.5 election timeouts, rounded up (--election-timeout)"
ZK_RANGE = ("Set --ttl within the ensemble's minSessionTimeout and maxSessionTimeout (zoo.cfg; by "
            "default 2 and 20 x tickTime), or those to admit it")


class GrantedTtl:
    """One registry's record of what it was granted: :meth:`check` logs a warning the first
    time a granted TTL differs from the one asked for (once a value: members may differ)."""

    def __init__(self, backend: str, where: str, noun: str, advice: str) -> None:
        self._head = f"{backend} at {where} grants {noun}"
        self._advice = advice
        self._told: set[float] = set()

    def check(self, granted: float, asked: float) -> None:
        log.debug("%s of %gs (asked: %gs)", self._head, granted, asked)
        if granted == asked or granted in self._told:
            return
        self._told.add(granted)
        log.warning("%s of %gs, not the %gs asked for (--ttl): a dead host's instances leave "
                    "after %gs. %s", self._head, granted, asked, granted, self._advice)
