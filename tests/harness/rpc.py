"""A gRPC error as a unary call raises it, for tests that play etcd's answers without one."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc


class Answer(grpc.RpcError):
    """What grpc raises for a failed unary call: a status code and etcd's details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class AuthClient:
    """pyetcd's client as ``EtcdAuth`` uses it, with etcd's ``Authenticate`` played: it
    answers ``token()``, or raises ``failure`` when set; every call is counted."""

    def __init__(self, token: Callable[[], str], failure: Answer | None = None) -> None:
        self.token, self.failure = token, failure
        self.timeout, self.metadata, self.calls = 1.0, None, 0
        self.authstub = self
        self.endpoint_in_use = SimpleNamespace(fail=lambda: None)

    def Authenticate(self, _request: Any, _timeout: float) -> Any:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return SimpleNamespace(token=self.token())
