"""An etcd JWT is renewed ahead of its expiry at a random moment (``EtcdAuth``, pure: a fake
stub), so a fleet whose tokens were issued together does not log in again together (each login
is a bcrypt in etcd: ~62 ms of its CPU). A simple token, or a JWT whose life left is too short
to plan (a clock far from etcd's), is renewed only when etcd says it expired. A renewal that
fails leaves the held token in use."""

from __future__ import annotations

import base64
import json
import statistics
from typing import Any

import grpc
import pytest

from discovery.registry import security
from discovery.registry.security import RENEW_MIN, EtcdAuth, Secrets, token_expiry
from tests.harness.rpc import Answer, AuthClient

NOW = 1_800_000_000.0  # wall clock of the fake etcd and of the host


def jwt(exp: Any) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": exp, "username": "a"}).encode())
    return f"eyJhbGciOiJSUzI1NiJ9.{claims.decode().rstrip('=')}.c2lnbmF0dXJl"


DOWN = Answer(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def issuing(life: float) -> AuthClient:
    """etcd issuing JWTs that live ``life`` seconds from the fake wall clock."""
    return AuthClient(token=lambda: jwt(clock[1] + life))


clock = [1000.0, NOW]  # monotonic, wall


@pytest.fixture(autouse=True)
def clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    clock[:] = [1000.0, NOW]
    monkeypatch.setattr(security.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(security.time, "time", lambda: clock[1])


def advance(seconds: float) -> None:
    clock[0] += seconds
    clock[1] += seconds


def renewals(auth: EtcdAuth, client: AuthClient, seconds: float, step: float = 1.0) -> list[float]:
    """Calls every ``step`` s for ``seconds``: when (into the token's life) each login came."""
    out, issued, logins = [], clock[0], client.calls
    for _ in range(round(seconds / step)):
        auth.ensure()
        if client.calls != logins:
            out.append(clock[0] - issued)
            issued, logins = clock[0], client.calls
        advance(step)
    return out


def test_token_expiry_reads_a_jwt_and_nothing_else() -> None:
    assert token_expiry(jwt(1234)) == 1234.0
    assert token_expiry("LrEwOoIMZtQHOeOn.27") is None  # etcd's simple token
    for bad in ("a.b.c", "a.!!.c", jwt("soon"), jwt(True), jwt(None), "..", ""):
        assert token_expiry(bad) is None, bad


def test_a_jwt_is_renewed_between_half_and_nine_tenths_of_its_life() -> None:
    lives = []
    for _ in range(40):  # forty hosts whose tokens were issued at the same moment
        client = issuing(life=300.0)
        auth = EtcdAuth(client, Secrets(user="a", password="pw"), "127.0.0.1:2379")
        clock[:] = [1000.0, NOW]
        lives += renewals(auth, client, 301.0)[1:2]  # [0]: the first login, at once
    assert len(lives) == 40, lives  # each renewed once before its expiry at 300 s
    assert all(150.0 <= t <= 271.0 for t in lives), lives
    assert statistics.pstdev(lives) > 15, lives  # spread over two minutes, not together


def test_a_failed_renewal_keeps_the_token_and_tries_again_later() -> None:
    client = issuing(life=300.0)
    auth = EtcdAuth(client, Secrets(user="a", password="pw"), "127.0.0.1:2379")
    auth.ensure()
    held = client.metadata
    client.failure = DOWN
    advance(271.0)  # past any planned renewal
    auth.ensure()  # the renewal times out: no error for the caller, the token held serves
    assert client.metadata == held
    logins = client.calls
    client.failure = None
    advance(RENEW_MIN - 1)
    auth.ensure()
    assert client.calls == logins  # not before RENEW_MIN
    advance(1.0)
    auth.ensure()
    assert client.calls == logins + 1 and client.metadata != held


@pytest.mark.parametrize("life", [5.0, -60.0])
def test_a_jwt_too_short_to_plan_is_renewed_only_when_etcd_says_so(life: float) -> None:
    """A short life, or a host clock ahead of etcd's: no renewal ahead (it would log in at
    every call); etcd's 'invalid auth token' drops it, as a simple token."""
    client = issuing(life=life)
    auth = EtcdAuth(client, Secrets(user="a", password="pw"), "127.0.0.1:2379")
    assert renewals(auth, client, 100.0) == [0.0]
    assert auth.stale("etcdserver: invalid auth token")
    auth.ensure()
    assert client.calls == 2
