"""The client's ``timeout``: a finite number of seconds above 0, refused at once otherwise."""

from __future__ import annotations

import math
from typing import Any

import pytest

from discovery.client import Client
from discovery.errors import ConfigError


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 0, 0.0, -1, -0.5, True,
                                 "5", None])
def test_a_timeout_not_a_finite_number_above_0_is_refused(
        bad: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    monkeypatch.setattr("discovery.client.open_registry", lambda *a, **kw: opened.append(a))
    with pytest.raises(ConfigError, match=r"timeout") as caught:
        Client("etcd://127.0.0.1:1/x", timeout=bad)
    assert repr(bad) in str(caught.value)
    assert not opened  # refused before any connection is made


@pytest.mark.parametrize("good", [0.001, 1, 5.0, 3600])
def test_a_finite_timeout_above_0_is_taken(good: float) -> None:
    with Client("etcd://127.0.0.1:1/x", timeout=good) as client:
        assert client.timeout == good
