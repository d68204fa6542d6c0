"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from discovery.agent.health import CheckScheduler


@pytest.fixture
def check_scheduler() -> Iterator[CheckScheduler]:
    """The timer and workers a :class:`CheckRunner` runs on, as in the agent; stopped after."""
    scheduler = CheckScheduler()
    yield scheduler
    scheduler.stop()
