"""A ZooKeeper watch whose reads are refused (NoAuth) must not hammer the ensemble:

- the services directory locked against this client (its ACL changed to digest-only, then
  the session expired): the watch says so and reads everything again 5 s later, then 10, 20,
  up to 60 s, and from 5 s again once a full read succeeded (it re-read the whole registry
  every 5 s, forever: one such read a host every 5 s, a fleet's at once);
- one service directory locked, among readable ones or planted alone in a catalog with
  nothing readable yet, followed with one-shot watches (an ensemble without persistent
  watches: before 3.6, or ``WatchManagerOptimized``; here a 3.6+ server sent an opcode it does
  not know): a new service is followed at once, the locked directory skipped as the full read
  skips it (every change to the list of services made every such watch stall 5 s and then
  re-read the whole registry: a new service followed after 5.03 s, not 0.01 s).

Refusals are counted in the watch's log, its changes and ``registry.reads``.
"""

from __future__ import annotations

import itertools
import logging
import re
import time

import pytest
from kazoo.client import KazooClient
from kazoo.security import OPEN_ACL_UNSAFE

from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import (
    Change,
    Registry,
    RegistryURL,
    open_registry,
    zk_persistent,
    zk_setback,
    zk_watch,
)
from discovery.registry.view import ServicesView
from tests.harness.raw_clients import expire_zk_session
from tests.harness.registries import LOCKED
from tests.harness.servers import ServerCluster, unique_prefix, wait_until

pytestmark = pytest.mark.integration

REFUSED = re.compile(r"ZooKeeper watch may not read .* \(NoAuth\).* in ([0-9.]+) ?s")


def inst(n: int, service: str = "web") -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[float, str]]:
    """The watch's NoAuth warnings so far: (when, message)."""
    return [(r.created, r.getMessage()) for r in caplog.records
            if r.name == zk_watch.__name__ and "(NoAuth)" in r.getMessage()]


def waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits those warnings announce (none: they announce none)."""
    found = [REFUSED.search(message) for _, message in refusals(caplog)]
    return [float(m.group(1)) for m in found if m]


def followed(url: str, regs: list[Registry]) -> tuple[Registry, Registry, list[Change]]:
    """A writer with one instance, and a reader (no credentials) watching from its snapshot."""
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    writer.register(inst(1))
    seen: list[Change] = []
    reader.watch(seen.append, reader.snapshot().revision)
    return writer, reader, seen


def test_the_wait_starts_again_once_a_full_read_succeeds(
        zk: ServerCluster, regs: list[Registry], other: KazooClient,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The services directory locked, the session expired: the full reads refused are tried
    again after waits that double (shortened here to 0.4 s doubling to 1.6; the default's 5,
    10, 20 ... 60 s is tests/unit/test_zk_setbacks.py's), and from the first again once one
    succeeds."""
    monkeypatch.setattr(zk_watch, "REFUSED_WAIT", (0.4, 1.6), raising=False)  # 0.4 .. 1.6 s
    url = zk.url(unique_prefix())
    root = RegistryURL.parse(url).services_root
    _, reader, seen = followed(url, regs)
    other.set_acls(root, LOCKED)
    expire_zk_session(reader.client)
    wait_until(lambda: len(refusals(caplog)) >= 4, 10, "four refused full reads")
    announced = waits(caplog)[:4]
    assert announced == pytest.approx([0.4, 0.8, 1.6, 1.6], rel=0.15)  # up to the most
    times = [t for t, _ in refusals(caplog)][:4]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"gaps between refused full reads: {', '.join(f'{g:.2f}' for g in gaps)} s")
    for gap, wait in zip(gaps, announced, strict=False):  # it waits what it says (to 0.1 s,
        assert wait - 0.05 <= gap <= wait + 1.5, (gaps, announced)  # as it says it), then reads

    other.set_acls(root, OPEN_ACL_UNSAFE)  # read again: the watch's reset delivers the catalog
    wait_until(lambda: [c.kind for c in seen][-1:] == ["reset"], 10, "the reset once readable")
    assert set(seen[-1].snapshot.instances) == {inst(1).key}  # type: ignore[union-attr]
    caplog.clear()
    other.set_acls(root, LOCKED)
    expire_zk_session(reader.client)
    wait_until(lambda: len(refusals(caplog)) >= 2, 10, "refused again")
    assert waits(caplog)[:2] == pytest.approx([0.4, 0.8], rel=0.15)  # from the start again


def served(seen: list[Change]) -> set[tuple[str, str]]:
    """The instances the changes so far hold (puts and resets minus deletes)."""
    keys: set[tuple[str, str]] = set()
    for c in seen:
        if c.kind == "reset" and c.snapshot is not None:
            keys = set(c.snapshot.instances)
        elif c.key is not None:
            (keys.add if c.kind == "put" else keys.discard)(c.key)
    return keys


def watch_count(zk: ServerCluster) -> int:
    """The watches the server holds, data and child (``mntr``)."""
    for line in zk.four_letter(0, "mntr").splitlines():
        if line.startswith("zk_watch_count"):
            return int(line.split()[1])
    raise AssertionError("no zk_watch_count in mntr")


def watchers(zk: ServerCluster, path: str) -> set[int]:
    """The sessions the server holds a watch of ``path`` for (``wchp``: a path, then its
    sessions indented; the writer's watch of its own node is there too: ``zk_own``)."""
    sessions: set[int] = set()
    current = None
    for line in zk.four_letter(0, "wchp").splitlines():
        if line and not line[0].isspace():
            current = line
        elif current == path and line.strip():
            sessions.add(int(line.strip(), 16))
    return sessions


@pytest.mark.parametrize("catalog", ["among readable services", "alone"])
def test_one_locked_service_directory_holds_back_no_new_service(
        zk: ServerCluster, regs: list[Registry], other: KazooClient, catalog: str,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zk_persistent.AddWatch, "type", 250)  # UNIMPLEMENTED: one-shot watches
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    evil = parsed.service_dir("evil")
    other.ensure_path(parsed.services_root)  # (open: create(makepath=) would lock it too)
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    seen: list[Change] = []
    if catalog == "alone":  # planted in a catalog that has nothing readable yet
        watches = watch_count(zk)
        reader.watch(seen.append, reader.snapshot().revision)
        wait_until(lambda: watch_count(zk) > watches, 10, "the one-shot watch on the services")
        other.create(evil, b"", acl=LOCKED)  # the watch lists it, is refused
        wait_until(lambda: evil in caplog.text, 10, "the locked directory skipped")
    else:
        other.create(evil, b"", acl=LOCKED)  # planted against us before the watch
        writer.register(inst(1))
        reader.watch(seen.append, reader.snapshot().revision)
        web = parsed.key(*inst(1).key)  # its full read's last: the listings' watches before it
        wait_until(lambda: reader.client.client_id[0] in watchers(zk, web), 10,  # type: ignore
                   "the full read's one-shot watches")  # (AddWatch refused: it reconnected first)
        assert evil in caplog.text  # the full read skipped it
    before, skipped, changes = reader.reads.counts(), reader.invalid_records, len(seen)
    for n, service in enumerate(["api", "db"], 2):  # each changes the list of services
        added = inst(n, service)
        start = time.monotonic()
        writer.register(added)
        wait_until(lambda key=added.key: key in served(seen), 10, f"{service} followed")
        took = time.monotonic() - start
        print(f"{service}: followed after {took:.2f} s")
        assert took < 2.0, took  # 5 s before: a refused listing, a wait, a full read
    assert [c.kind for c in seen[changes:]] == ["put", "put"]  # no reset
    assert (reader.reads.counts() - before).full_reads == 0
    assert reader.invalid_records > skipped  # each refused listing counted as the scan counts
    assert not refusals(caplog)  # no "may not read ... (NoAuth)": no wait, no reset


@pytest.mark.parametrize("follows", ["everything", "web and api"])
def test_a_service_locked_later_keeps_its_instances_until_it_may_be_listed(
        zk: ServerCluster, regs: list[Registry], other: KazooClient, follows: str,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """One service's directory locked by mistake, then a full read (the reader's session
    expired): the service keeps its instances (the reset emptied it, on every host whose
    session went with the ensemble); the directory is listed again (nothing read) after the
    refusals' doubling wait, and once it may be, everything is read again: what changed
    meanwhile shows."""
    monkeypatch.setattr(zk_watch, "REFUSED_WAIT", (0.4, 1.6), raising=False)
    caplog.set_level(logging.DEBUG, logger=zk_setback.__name__)
    url = zk.url(unique_prefix())
    api = RegistryURL.parse(url).service_dir("api")
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    web, old, new = inst(1), inst(2, "api"), inst(3, "api")
    writer.register(web)
    # another writer's (an agent would write back its own instance deleted below: at random
    # within 3 s, after or before the read this test waits for)
    other.create(f"{api}/{old.id}", old.to_json(), ephemeral=True, makepath=True)
    source = reader if follows == "everything" else ServicesView(reader, ["web", "api"])
    catalog, seen = Catalog(), []
    catalog.load(source.snapshot())
    source.watch(lambda c: (seen.append(c.kind), catalog.apply(c)), source.snapshot().revision)
    other.set_acls(api, LOCKED)
    assert source.snapshot().withheld == {"api"}  # the registry's own read names it

    expire_zk_session(reader.client)
    wait_until(lambda: "reset" in seen, 10, "the watch's reset after the expiry")
    assert catalog.get(old.key) == old and catalog.get(web.key) == web
    before = reader.reads.counts()
    other.delete(f"{api}/{old.id}")  # meanwhile: one instance goes, another comes
    other.create(f"{api}/{new.id}", new.to_json())
    wait_until(lambda: caplog.text.count("still refused") >= 3, 10, "three listings refused")
    assert (reader.reads.counts() - before).full_reads == 0  # listed, not read
    assert catalog.get(old.key) == old  # kept as it was while we may not look

    other.set_acls(api, OPEN_ACL_UNSAFE)
    start = time.monotonic()
    wait_until(lambda: catalog.get(new.key) is not None and catalog.get(old.key) is None, 10,
               "the service read again once it may be listed")
    took = time.monotonic() - start
    print(f"read again {took:.2f} s after the ACL was fixed")
    assert took < 1.6 * 1.1 + 1.0, took  # the longest wait, jittered, and a read
    assert catalog.get(web.key) == web and seen.count("reset") == 2
