"""A gRPC error as a unary call raises it, for tests that play etcd's answers without one."""

from __future__ import annotations

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
