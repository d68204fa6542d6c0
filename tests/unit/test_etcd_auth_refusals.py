"""A login etcd refuses is not asked again at every call (``EtcdAuth``, pure: a fake stub).

A rotated password leaves every host of a fleet with the old one; each failed login costs etcd
a bcrypt (~61 ms of its CPU). The calls meanwhile fail with the same error, told when it is
asked again; a login that works starts the wait over.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import grpc
import pytest
from pyetcd import exceptions as etcd_exc

from discovery.errors import LoginRefused, RegistryError
from discovery.registry import etcd_refusal
from discovery.registry.security import EtcdAuth, Secrets, rpc_details
from tests.harness.rpc import Answer, AuthClient

REFUSED = Answer(grpc.StatusCode.INVALID_ARGUMENT,
                 "etcdserver: authentication failed, invalid user ID or password")


def refusing() -> AuthClient:
    return AuthClient(token=lambda: "t0k3n", failure=REFUSED)


def test_a_refused_login_is_asked_again_after_a_growing_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    monkeypatch.setattr("discovery.retry.random.uniform", lambda a, b: (a + b) / 2)  # no jitter
    client = refusing()
    auth = EtcdAuth(client, Secrets(user="alice", password="old"), "127.0.0.1:2379")

    def tries(seconds: float, step: float = 0.1) -> int:
        """Calls every ``step`` s for ``seconds``: how many reached etcd."""
        before = client.calls
        for _ in range(round(seconds / step)):
            with pytest.raises(RegistryError, match="authentication as 'alice' failed"):
                auth.ensure()
            now[0] += step
        return client.calls - before

    assert tries(0.1) == 1  # the first call asks
    assert tries(0.8) == 0  # then nothing for 1 s: the same error, said so
    with pytest.raises(RegistryError, match=r"asked again in 0\.1 s"):
        auth.ensure()
    assert tries(60.0) == 5  # 1, 3, 7, 15 and 31 s after the first: not 600 times
    assert tries(120.0) == 2  # at most once a minute
    client.failure = None  # the password fixed in etcd
    now[0] += 60.0
    auth.ensure()  # asked again: the token
    assert client.metadata == (("token", "t0k3n"),)
    auth.drop()  # etcd restarted: a new login at once (the refusals were forgotten)
    client.failure = REFUSED
    with pytest.raises(RegistryError):
        auth.ensure()
    now[0] += 1.0
    assert tries(0.1) == 1  # 1 s after, as the first time


def test_a_login_that_timed_out_in_the_server_is_no_refusal() -> None:
    """A member's proposal timed out (an election: etcd 3.4 logs in through raft) is a member
    that cannot answer now, tried again elsewhere as a call is: it was an error of its own,
    which ended the call at once and which a watch took for a refusal (a doubling wait, the
    registry not reported down), for every host of a fleet that logged in during an election
    (after a restart, which forgets simple tokens)."""
    client = refusing()
    auth = EtcdAuth(client, Secrets(user="alice", password="right"), "127.0.0.1:2379")
    client.failure = Answer(grpc.StatusCode.UNKNOWN, "context deadline exceeded")
    for _ in range(3):
        with pytest.raises(etcd_exc.ConnectionFailedError) as caught:
            auth.ensure()
        assert not etcd_refusal.refused(caught.value)
        assert "deadline exceeded" in rpc_details(caught.value)  # (why, in the call's error)
    assert client.calls == 3  # asked each time: not a wrong password
    client.failure = None
    auth.ensure()
    assert client.metadata == (("token", "t0k3n"),)


def test_a_watch_refused_its_login_tries_when_the_login_may_be_asked_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch-only host's watch and its liveness read (every TTL) log in on one
    ``EtcdAuth``. The watch's own refusal wait doubled as the login's did: the liveness read
    made the login at its moment, the watch's try after it was refused unsent and doubled
    its wait again, so a password fixed in etcd was followed again well over a minute later
    (``bench/auth_refused.py``: 92-102 s after a fix 120 s into the refusal). Now the watch
    waits for the login's next moment: within its longest wait, a minute, of the fix."""
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    monkeypatch.setattr(etcd_refusal, "spread", lambda _spread: 0.0)
    late = []
    for fix in range(240, 420, 7):  # the fix at moments all over the waits' cycle
        client = refusing()
        auth = EtcdAuth(client, Secrets(user="alice", password="old"), "127.0.0.1:2379")
        failures = etcd_refusal.WatchFailures("127.0.0.1:2379", 3.0, logging.getLogger("t"))
        start = now[0]
        watch_at, pulse_at, tries = start, start + 10.0, 0
        while True:  # whichever of the two comes first
            now[0] = min(watch_at, pulse_at)
            if now[0] - start >= fix:
                client.failure = None  # the password fixed in etcd
            if now[0] == pulse_at:
                pulse_at += 10.0  # the liveness read, every TTL; its failure changes nothing
                with contextlib.suppress(LoginRefused):
                    auth.ensure()
                continue
            tries += 1
            try:
                auth.ensure()
                break
            except LoginRefused as exc:
                watch_at = now[0] + failures.refusal_wait(exc, 0)
        assert tries >= 7  # it ran through the doubling
        late.append(now[0] - start - fix)
    assert len(late) == 26 and max(late) <= 60.0, late  # within the login's longest wait


def test_a_fleet_refused_at_once_asks_again_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The waits are jittered (±25 %, at most a minute): a fleet whose password etcd refused
    at one moment (a restart) did not log in again in lockstep, a wave of bcrypts each
    minute that held a 2-core cluster's CPU full for ~15 s at 400 hosts."""
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    fleet = [EtcdAuth(refusing(), Secrets(user="alice", password="old"), "127.0.0.1:2379")
             for _ in range(50)]
    waits = []
    for auth in fleet:
        for _ in range(8):  # refused 8 times: at the longest wait
            with pytest.raises(LoginRefused) as refused:
                auth.ensure()
            now[0] += 61.0
        waits.append(refused.value.retry_in)
    assert 45.0 <= min(waits) < max(waits) <= 60.0, waits
    assert len({round(w, 3) for w in waits}) > 10, waits


def test_a_login_that_fails_after_its_wait_holds_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused login's wait ran out, and the next login found no member (a timeout, an
    election): that is no refusal. Before, the refusal stayed and nothing was due, so every
    call failed unsent, the password fixed or not, until the process restarted; a watch
    then retried it every 0-3 s."""
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    client = refusing()
    auth = EtcdAuth(client, Secrets(user="alice", password="old"), "127.0.0.1:2379")
    with pytest.raises(LoginRefused):
        auth.ensure()
    now[0] += 2.0  # the wait is over
    client.failure = Answer(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(etcd_exc.ConnectionFailedError):
        auth.ensure()
    client.failure = None  # the member back, the password fixed
    calls = client.calls
    auth.ensure()  # asked at once
    assert client.calls == calls + 1 and client.metadata == (("token", "t0k3n"),)


def test_a_renewal_that_lands_after_a_refused_login_keeps_its_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A JWT's renewal is asked outside the lock. Meanwhile etcd dropped the token and the
    next login was refused (the password changed in between); then the renewal's answer came,
    too late to install. It must leave that refusal's wait as it is: before, it cleared the
    wait but not the refusal, and every call failed unsent from then on."""
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    monkeypatch.setattr("discovery.registry.security.time.monotonic", lambda: now[0])
    client = AuthClient(token=lambda: "t0k3n")
    auth = EtcdAuth(client, Secrets(user="alice", password="pw"), "127.0.0.1:2379")
    auth.ensure()  # the token, held
    renew = client.Authenticate

    def meanwhile(request: Any, timeout: float) -> Any:
        monkeypatch.setattr(client, "Authenticate", renew)  # (the renewal's, answered after)
        auth.drop()  # etcd forgot the token, and the next login is refused
        client.failure = REFUSED
        with pytest.raises(LoginRefused):
            auth.ensure()
        client.failure = None
        return renew(request, timeout)

    monkeypatch.setattr(client, "Authenticate", meanwhile)
    auth._renew_at = now[0]  # the held token's renewal is due
    auth.ensure()  # renews (the token held is not used: it was dropped meanwhile)
    assert client.metadata is None
    with pytest.raises(LoginRefused, match="asked again in"):
        auth.ensure()  # the refusal's wait holds
    now[0] += 2.0
    auth.ensure()  # then asked: the password works again
    assert client.metadata == (("token", "t0k3n"),)
