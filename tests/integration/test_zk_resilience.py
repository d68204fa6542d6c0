"""What one bad node, one refused write or one raced write must not do to a ZooKeeper registry:

- an instance node whose ACL denies us READ (anyone may create one in a world-writable service
  directory) is skipped as a record that cannot be decoded is; every other instance is read
  and followed (a snapshot failed, and every watch reset retried forever);
- a service directory made after a watch's full read, empty when the link went, still tells
  of an instance created in it during the cut;
- after a session expiry, one instance that cannot be registered again (its service directory
  locked by another identity) does not hold back the others, and is retried alone;
- a deregister while the recovery writes that instance is not undone by the write;
- a watch whose session expires while it is made (its read done in the old session, the
  recovery run before the registry knew it) is read again and follows the new session.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.security import OPEN_ACL_UNSAFE

from discovery.model import Instance
from discovery.registry import (
    Change,
    Registry,
    RegistryURL,
    open_registry,
    zk_claim,
    zk_multi,
    zk_persistent,
)
from discovery.registry import zk as zk_registry
from discovery.registry.base import FIRST_READ
from tests.harness.raw_clients import expire_zk_session
from tests.harness.registries import LOCKED
from tests.harness.servers import ServerCluster, unique_prefix, wait_until
from tests.harness.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration



def inst(n: int, service: str = "web") -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


def keys(seen: list[Change], kind: str) -> set[tuple[str, str]]:
    return {c.key for c in seen if c.kind == kind and c.key is not None}


@pytest.mark.parametrize("mode", ["multiRead", "a request a path", "one-shot watches"])
def test_an_instance_node_we_may_not_read_is_skipped(
        zk: ServerCluster, regs: list[Registry], other: KazooClient, mode: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    if mode == "a request a path":
        monkeypatch.setattr(zk_multi.MultiRead, "type", 250)  # no such opcode: UNIMPLEMENTED
    elif mode == "one-shot watches":
        monkeypatch.setattr(zk_persistent.AddWatch, "type", 250)
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    writer, reader = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [writer, reader]
    web, api = inst(1), inst(2, "api")
    writer.register(web)
    writer.register(api)
    first = parsed.key("web", "node-1:locked-1:80")
    other.create(first, b"{}", acl=LOCKED)
    other.create(f"{parsed.prefix}/nodes/node-1/web/node-1:locked-1:80", b"")  # its index entry
    if mode != "one-shot watches":  # a whole directory planted against us, among open ones
        other.create(parsed.service_dir("evil"), b"", acl=LOCKED)

    assert set(reader.snapshot().instances) == {web.key, api.key}
    assert set(reader.node_snapshot("node-1").instances) == {web.key, api.key}
    assert first in caplog.text and "NoAuth" in caplog.text
    assert reader.invalid_records >= 2

    seen: list[Change] = []
    reader.watch(seen.append, 1)  # older than what is there: a reset, from its full read
    wait_until(lambda: [c.kind for c in seen] == ["reset"], 10, "the watch's reset")
    assert set(seen[0].snapshot.instances) == {web.key, api.key}  # type: ignore[union-attr]
    second = parsed.key("web", "node-1:locked-2:80")
    other.create(second, b"{}", acl=LOCKED)  # one-shot watches: listed, its read refused
    added = inst(3)  # (a persistent watch does not tell of a node we may not read)
    writer.register(added)
    wait_until(lambda: added.key in keys(seen, "put"), 10, "the put after the locked node")
    if mode == "one-shot watches":
        wait_until(lambda: second in caplog.text, 5, "the second locked node named")
    writer.deregister(*api.key)
    wait_until(lambda: api.key in keys(seen, "delete"), 10, "the delete")
    assert [c.kind for c in seen].count("reset") == 1


def test_a_service_made_after_the_read_and_empty_at_a_cut_is_followed(
        zk: ServerCluster, regs: list[Registry]) -> None:
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    writer = open_registry(url, ttl=5)
    regs.append(writer)
    writer.register(inst(1))
    proxy = TcpProxy(parsed.hosts[0])
    try:
        reader = open_registry(proxy.url("zk", parsed.prefix), ttl=5)
        regs.append(reader)
        states: list[bool] = []
        reader.add_state_listener(states.append)
        seen: list[Change] = []
        reader.watch(seen.append, reader.snapshot().revision)
        first = inst(2, "newsvc")  # a service the watch's full read did not see
        writer.register(first)
        wait_until(lambda: first.key in keys(seen, "put"), 10, "newsvc's first put")
        writer.deregister(*first.key)  # its directory stays, empty
        wait_until(lambda: first.key in keys(seen, "delete"), 10, "newsvc's delete")
        later = inst(3, "newsvc")
        with proxy.blocked():
            wait_until(lambda: states[-1:] == [False], 10, "the reader to see the link down")
            writer.register(later)
        wait_until(lambda: states[-1:] == [True], 10, "the reader to reconnect")
        wait_until(lambda: later.key in keys(seen, "put"), 10, "the put made during the cut")
        assert "reset" not in [c.kind for c in seen]
    finally:
        proxy.close()


def owner(look: KazooClient, path: str) -> int | None:
    stat = look.exists(path)
    return None if stat is None else int(stat.ephemeralOwner)


def test_one_instance_refused_after_an_expiry_holds_back_no_other(
        zk: ServerCluster, regs: list[Registry], other: KazooClient,
        caplog: pytest.LogCaptureFixture) -> None:
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    web, api, db = inst(1), inst(2, "api"), inst(3, "db")
    for i in (web, api, db):
        reg.register(i)
    other.set_acls(parsed.service_dir("web"), LOCKED)  # we may create nothing in it now
    client: Any = reg.client  # type: ignore[attr-defined]

    expire_zk_session(client)

    new = client.client_id[0]
    wait_until(lambda: {owner(other, parsed.key(*i.key)) for i in (api, db)} == {new}, 10,
               "api and db registered again")
    wait_until(lambda: f"re-register web/{web.id} refused (NoAuth)" in caplog.text, 10,
               "the refused one named")
    other.set_acls(parsed.service_dir("web"), OPEN_ACL_UNSAFE)  # fixed: retried, alone
    wait_until(lambda: owner(other, parsed.key(*web.key)) == new, 10, "web registered again")


class Contended:
    """A lock that tells when a thread had to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waited = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waited.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_deregister_while_the_recovery_writes_is_not_undone(
        zk: ServerCluster, regs: list[Registry], other: KazooClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    claim_together = zk_claim.ZkClaims.claim_together

    def paused(self: zk_claim.ZkClaims, owned: list[Instance]) -> list[Instance]:
        entered.set()
        release.wait(10)  # the recovery's write in flight
        return claim_together(self, owned)

    monkeypatch.setattr(zk_claim.ZkClaims, "claim_together", paused)
    url = zk.url(unique_prefix())
    parsed = RegistryURL.parse(url)
    reg = open_registry(url, ttl=5)
    regs.append(reg)
    gone, kept = inst(1), inst(2)
    reg.register(gone)
    reg.register(kept)
    writes = Contended()
    monkeypatch.setattr(reg, "_writes", writes, raising=False)
    client: Any = reg.client  # type: ignore[attr-defined]

    expire_zk_session(client)
    assert entered.wait(10)
    leaving = threading.Thread(target=reg.deregister, args=gone.key)
    leaving.start()
    wait_until(lambda: not leaving.is_alive() or writes.waited.is_set(), 10,
               "the deregister to return, or to wait for the write")
    release.set()
    leaving.join(10)
    assert not leaving.is_alive()

    new = client.client_id[0]
    wait_until(lambda: owner(other, parsed.key(*kept.key)) == new, 10, "kept registered again")
    index = f"{parsed.prefix}/nodes/node-1/web"
    assert other.get_children(parsed.service_dir("web")) == [kept.id]
    assert other.get_children(index) == [kept.id]


def test_a_watch_made_while_its_session_expires_is_read_again(
        zk: ServerCluster, regs: list[Registry], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The watch's first read is done, its watches armed, then its session expires and the
    recovery resets the registry's watches before ``watch()`` has added it to them (the
    window a client's ``follow`` widens: it stops its old watch there). The new watch must
    be read again: its watches went with the old session, and it would hear of nothing more."""
    caplog.set_level(logging.WARNING, logger=zk_registry.__name__)
    url = zk.url(unique_prefix())
    reader, writer = open_registry(url, ttl=5), open_registry(url, ttl=5)
    regs += [reader, writer]
    writer.register(inst(1))
    client: Any = reader.client  # type: ignore[attr-defined]
    made = zk_registry.ZkWatch
    expired: list[bool] = []

    class ExpiresAfterItsRead(made):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            expire_zk_session(client)
            wait_until(lambda: any("session expired; re-registering" in r.getMessage()
                                   for r in caplog.records), 10, "the recovery's reset")
            expired.append(True)

    monkeypatch.setattr(zk_registry, "ZkWatch", ExpiresAfterItsRead)
    seen: list[Change] = []
    reader.watch(seen.append, FIRST_READ)
    assert expired
    assert inst(1).key in seen[0].snapshot.instances  # type: ignore[union-attr]
    writer.register(inst(2))  # in the new session: only a watch armed there tells of it
    wait_until(lambda: inst(2).key in keys(seen, "put") | {
        k for c in seen if c.kind == "reset" and c.snapshot for k in c.snapshot.instances},
        10, "the instance registered after the expiry")
