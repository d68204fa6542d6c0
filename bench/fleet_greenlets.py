#!/usr/bin/env python3
"""A ``bench/fleet.py`` worker whose ZooKeeper hosts run as gevent greenlets
(``--zk-hosts greenlets``): the standard library made cooperative (``monkey.patch_all()``)
before anything else is imported, then ``fleet.py`` itself. The hosts' code is unchanged:
kazoo's threading handler and the registry's own threads become greenlets, taking their turn
on one OS thread in the order they became ready, instead of ~765 threads of a worker
contending for its GIL (docs/benchmarks.md). Not for etcd hosts: grpc-python's own threads
are not greenlets."""

from gevent import monkey

monkey.patch_all()

import runpy  # noqa: E402  (after the patching, as everything else)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gevent.fileobject import FileObject  # noqa: E402

# The parent's commands: read without holding every other greenlet.
sys.stdin = FileObject(sys.stdin.fileno(), "r")
runpy.run_path(str(Path(__file__).with_name("fleet.py")), run_name="__main__")
