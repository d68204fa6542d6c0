#!/usr/bin/env python3
"""A ``bench/fleet.py`` worker whose ZooKeeper hosts run as gevent greenlets
(``--zk-hosts greenlets``): the standard library made cooperative (``monkey.patch_all()``)
before anything else is imported, then ``fleet.py`` itself. The hosts' code is unchanged:
kazoo's threading handler and the registry's own threads become greenlets, taking their turn
on one OS thread in the order they became ready, instead of ~765 threads of a worker
contending for its GIL (docs/benchmarks.md). Not for etcd hosts: grpc-python's own threads
are not greenlets.

Its one change to the hosts' code is their connections' wait for a socket
(``discovery.registry.zk_io._poll``): gevent's ``select.poll`` makes and starts a watcher per
socket and a result object at every call, and kazoo's ``selector_select`` a selector around
it. Here the system's own ``poll`` tells at once what is ready; only when nothing is does the
greenlet wait on the hub, one watcher a socket, then poll again. Its time-out is timed from
the moment it waits: libev times a timer from the loop's clock, which stands still while
greenlets keep the CPU, so after a busy turn a wait ended early by as long as that turn took
(kazoo's loop turned again; a read's wait, ``zk_io.fewer_syscalls``, would raise kazoo's
socket time-out, a dropped connection, after a turn longer than it).
"""

from gevent import monkey

monkey.patch_all()

import runpy  # noqa: E402  (after the patching, as everything else)
import select  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from gevent import get_hub  # noqa: E402
from gevent.fileobject import FileObject  # noqa: E402
from gevent.hub import Waiter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from discovery.registry import zk_io  # noqa: E402

_system_poll = monkey.get_original("select", "poll")
_READ, _WRITE = select.POLLIN, select.POLLOUT


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


def poll(rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None
         ) -> tuple[list[Any], list[Any], list[Any]]:
    """What ``zk_io._poll`` answers (kazoo's ``selector_select`` over ``poll``: an object
    whose socket is readable, or hung up, is in the first list, else if writable in the
    second), waiting as a greenlet."""
    masks: dict[int, int] = {}
    for objs, bit in ((rlist, _READ), (wlist, _WRITE)):
        for fd in map(_fd, objs):
            masks[fd] = masks.get(fd, 0) | bit
    p = _system_poll()
    for fd, mask in masks.items():
        p.register(fd, mask)
    ready = p.poll(0)
    if not ready and timeout != 0:
        hub = get_hub()
        waiter: Waiter = Waiter(hub)
        woken: list[bool] = []

        def wake() -> None:
            if not woken:
                woken.append(True)
                waiter.switch(None)

        watchers = [hub.loop.io(fd, (1 if mask & _READ else 0) | (2 if mask & _WRITE else 0))
                    for fd, mask in masks.items()]
        try:
            for w in watchers:
                w.start(wake)
            if timeout is not None:  # from now: the loop's clock is stale after a busy turn
                watchers.append(timer := hub.loop.timer(timeout))
                timer.start(wake, update=True)
            waiter.get()
        finally:
            for w in watchers:
                w.stop()
                w.close()
        ready = p.poll(0)
    events = dict(ready)
    readable, writable = [], []
    for objs in (rlist, wlist):
        for obj in objs:
            ev = events.get(_fd(obj), 0)
            if ev & ~_WRITE:  # readable, hung up or failed: selectors counts it readable
                readable.append(obj)
            elif ev & _WRITE:
                writable.append(obj)
    return readable, writable, []


zk_io._poll = poll

if __name__ == "__main__":
    # The parent's commands: read without holding every other greenlet.
    sys.stdin = FileObject(sys.stdin.fileno(), "r")
    runpy.run_path(str(Path(__file__).with_name("fleet.py")), run_name="__main__")
