"""Tiny helpers shared by every test, the demo and the benchmarks (no pytest import)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from discovery.registry.devserver import (
    free_port,  # the package's own (up --dev picks ports with it)
)

T = TypeVar("T")

__all__ = ["free_port", "wait_for"]


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Exceptions raised by ``predicate`` count as "not yet" (the last one is chained to the
    error). Raises ``AssertionError`` with ``message`` if nothing truthy came back within
    ``timeout`` seconds. The predicate is always called at least once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if value:
                return value
            last_value = value
            last_exc = None
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"last error: {last_exc!r}" if last_exc is not None else f"last value: {last_value!r}"
    text = f"timed out after {timeout:g}s waiting for {message or 'condition'} ({detail})"
    raise AssertionError(text) from last_exc
