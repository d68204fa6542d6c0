"""EtcdRegistry._call: which failures are tried again (another member, a later try) and which
end the call at once. No server: the request is a function that fails as etcd answered."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from discovery.errors import RegistryError, RegistryUnavailable
from discovery.model import Instance
from discovery.registry.etcd import EtcdRegistry
from discovery.registry.url import RegistryURL
from tests.harness.rpc import Answer


@pytest.fixture
def reg() -> Iterator[EtcdRegistry]:
    # port 1 on loopback: nothing listens; _call never reaches it (fn is ours)
    r = EtcdRegistry(RegistryURL.parse("etcd://127.0.0.1:1/t"), ttl=3, timeout=1.0)
    yield r
    r.close()


def failing(*answers: Exception) -> tuple[list[int], Callable[[], str]]:
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        if calls[0] <= len(answers):
            raise answers[calls[0] - 1]
        return "ok"
    return calls, fn


def test_a_write_that_timed_out_in_an_election_is_sent_again(reg: EtcdRegistry) -> None:
    # etcd's answer when a proposal times out while the member has no leader
    timed_out = Answer(grpc.StatusCode.UNKNOWN, "context deadline exceeded")
    calls, fn = failing(timed_out, timed_out)
    assert reg._call("put /t/services/a/1", fn) == "ok"
    assert calls[0] == 3


def test_it_gives_up_at_the_deadline_naming_the_request(reg: EtcdRegistry) -> None:
    calls, fn = failing(*[Answer(grpc.StatusCode.UNKNOWN, "context deadline exceeded")] * 100)
    with pytest.raises(RegistryUnavailable, match="put /t/services/a/1 failed, no member"):
        reg._call("put /t/services/a/1", fn, patience=0.3)
    assert 2 <= calls[0] < 100


def test_other_unknown_answers_end_the_call_at_once(reg: EtcdRegistry) -> None:
    calls, fn = failing(Answer(grpc.StatusCode.UNKNOWN, "etcdserver: some other fault"))
    with pytest.raises(RegistryError, match="some other fault") as caught:
        reg._call("put /t/services/a/1", fn)
    assert not isinstance(caught.value, RegistryUnavailable)
    assert calls[0] == 1


def test_a_dead_member_does_not_hold_the_call_while_the_others_elect() -> None:
    """The member in use is SIGKILLed (refused at once); the other two time out (1 s each)
    while they elect a leader, then serve. Every try must not go back to the dead member: the
    pause between tries stays below the time a failed member is skipped (it once equalled it,
    and the call asked the dead member every 0.5 s until its deadline)."""
    from pyetcd import exceptions as etcd_exc

    r = EtcdRegistry(RegistryURL.parse("etcd://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/t"),
                     ttl=3, timeout=5.0)
    client = r.client
    dead = "127.0.0.1:1"
    client._current_endpoint_label = dead
    elected_at = time.monotonic() + 2.4
    tries: list[str] = []

    def put() -> str:
        client.channel  # noqa: B018 -- what a request does first: pick a member not failed
        member = client.endpoint_in_use
        tries.append(member.netloc)
        if member.netloc == dead:
            member.fail()
            raise etcd_exc.ConnectionFailedError()
        if time.monotonic() < elected_at:
            time.sleep(1.0)  # the per-request deadline: no leader to commit the write
            member.fail()
            raise etcd_exc.ConnectionTimeoutError()
        return "ok"

    try:
        assert r._call("put /t/services/a/1", put) == "ok"
    finally:
        r.close()
    assert tries.count(dead) <= 3, tries


def test_the_error_says_why_the_member_failed_not_that_it_is_skipped(reg: EtcdRegistry) -> None:
    """One member, refusing our TLS: the first try says why; the tries within the second it
    is skipped only say "no endpoint available". The error names the first."""
    from pyetcd import exceptions as etcd_exc

    calls = [0]

    def read() -> str:
        calls[0] += 1
        if calls[0] > 1:
            raise etcd_exc.NoServerAvailableError("No endpoint available and not failed")
        try:  # as pyetcd raises it: its own exception, the gRPC answer as the context
            raise Answer(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY")
        except grpc.RpcError:
            raise etcd_exc.ConnectionFailedError() from None

    with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY"):
        reg._call("read /t/services/", read, patience=0.3)
    assert calls[0] >= 2


def test_its_pauses_between_tries_are_jittered(reg: EtcdRegistry,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet whose requests failed at one moment (an election, a member lost) must not try
    again in step: each pause is its doubling ± half of it, at random (they were exact)."""
    pauses: list[float] = []
    monkeypatch.setattr(reg._closing, "wait", lambda seconds: pauses.append(seconds) or False)
    monkeypatch.setattr("discovery.registry.etcd.etcd_aio.TRANSIENT", (RegistryUnavailable,))
    for _ in range(20):
        _, fn = failing(*[RegistryUnavailable("gone")] * 3)
        assert reg._call("put /t/services/a/1", fn) == "ok"
    assert len(pauses) == 60
    firsts = pauses[::3]
    assert all(0.025 <= p <= 0.075 for p in firsts) and len(set(firsts)) > 10, firsts


def test_a_key_deleted_during_an_unfinished_rewrite_is_written_again_by_it(
        reg: EtcdRegistry) -> None:
    """After a new lease, a rewrite etcd partly refused goes on with the keys not yet written
    (``put_all``'s done set). One of those written that another writer deleted meanwhile was
    left to that rewrite by the write-back, and skipped by it as done: missing fleet-wide until
    the agent's reconcile (up to a resync period). Now the write-back hands it back to the
    rewrite."""
    key = ("web", "n1:abc:80")
    reg._owned[key] = Instance(service="web", id=key[1], node="n1", address="127.0.0.1",
                               port=80)
    reg._lease, reg._need_reput, reg._rewritten = 7, True, {key, ("db", "n1:abc:5432")}
    assert reg._restore(key, doubt=False) == ""  # left to the rewrite, which writes it
    assert reg._rewritten == {("db", "n1:abc:5432")}
    reg._lease = None  # (not ours to revoke at close)
