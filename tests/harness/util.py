"""Tiny helpers shared by every test, the demo and the benchmarks (no pytest import)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TypeVar

from discovery.registry.devserver import (
    free_port,  # the package's own (up --dev picks ports with it)
)

T = TypeVar("T")

__all__ = ["free_port", "require_tool", "wait_for"]


def require_tool(name: str, package: str) -> str:
    """The path of the program ``name`` (a name on PATH or a path); when it is missing the test
    *fails* (never skips): scripts/setup.sh, run by ``make test``, installs Debian ``package``,
    so a missing tool is a broken set-up, not a reason to test less."""
    path = shutil.which(name)
    if path is None:
        import pytest  # here, not at the top: the demo and the benchmarks run without pytest

        pytest.fail(f"{name} is missing: run scripts/setup.sh (apt-get install {package})",
                    pytrace=False)
    return path


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
