"""A login etcd refuses is not asked again at every call (``EtcdAuth``, pure: a fake stub).

A rotated password leaves every host of a fleet with the old one; each failed login costs etcd
a bcrypt (~61 ms of its CPU). The calls meanwhile fail with the same error, told when it is
asked again; a login that works starts the wait over.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from discovery.errors import RegistryError
from discovery.registry.security import EtcdAuth, Secrets


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return "etcdserver: authentication failed, invalid user ID or password"


class Stub:
    def __init__(self) -> None:
        self.calls = 0
        self.refuse = True

    def Authenticate(self, _request: Any, _timeout: float) -> Any:
        self.calls += 1
        if self.refuse:
            raise Refused()
        return type("Answer", (), {"token": "t0k3n"})()


class Client:
    def __init__(self) -> None:
        self.authstub, self.timeout, self.metadata = Stub(), 1.0, None


def test_a_refused_login_is_asked_again_after_a_growing_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("discovery.retry.time.monotonic", lambda: now[0])
    client = Client()
    auth = EtcdAuth(client, Secrets(user="alice", password="old"), "127.0.0.1:2379")

    def tries(seconds: float, step: float = 0.1) -> int:
        """Calls every ``step`` s for ``seconds``: how many reached etcd."""
        before = client.authstub.calls
        for _ in range(round(seconds / step)):
            with pytest.raises(RegistryError, match="authentication as 'alice' failed"):
                auth.ensure()
            now[0] += step
        return client.authstub.calls - before

    assert tries(0.1) == 1  # the first call asks
    assert tries(0.8) == 0  # then nothing for 1 s: the same error, said so
    with pytest.raises(RegistryError, match=r"not asked again until 1 s after that refusal"):
        auth.ensure()
    assert tries(60.0) == 5  # 1, 3, 7, 15 and 31 s after the first: not 600 times
    assert tries(120.0) == 2  # at most once a minute
    client.authstub.refuse = False  # the password fixed in etcd
    now[0] += 60.0
    auth.ensure()  # asked again: the token
    assert client.metadata == (("token", "t0k3n"),)
    auth.drop()  # etcd restarted: a new login at once (the refusals were forgotten)
    client.authstub.refuse = True
    with pytest.raises(RegistryError):
        auth.ensure()
    now[0] += 1.0
    assert tries(0.1) == 1  # 1 s after, as the first time


class TimedOut(Refused):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return "context deadline exceeded"  # a member's proposal timed out (an election)


def test_a_login_that_timed_out_in_the_server_is_no_refusal() -> None:
    client = Client()
    auth = EtcdAuth(client, Secrets(user="alice", password="right"), "127.0.0.1:2379")

    def timed_out(_request: Any, _timeout: float) -> Any:
        client.authstub.calls += 1
        raise TimedOut()

    client.authstub.Authenticate = timed_out  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(RegistryError, match="deadline exceeded"):
            auth.ensure()
    assert client.authstub.calls == 3  # asked each time: not a wrong password
