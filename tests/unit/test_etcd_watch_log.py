"""What a broken etcd watch logs about where it resumes (registry/etcd_refusal.py): the
revision after the last one delivered, or the present when none was delivered yet (a stream
cut before its first answer starts its watchers from now, not from revision 1)."""

from __future__ import annotations

import logging

import pytest

from discovery.errors import RegistryUnavailable
from discovery.registry.etcd_refusal import WatchFailures, resuming


def test_resuming_names_the_next_revision_or_the_present() -> None:
    assert resuming(41) == "from revision 42"
    assert resuming(0) == "from the present"


@pytest.mark.parametrize(("revision", "said"), [(0, "resuming from the present"),
                                                (7, "resuming from revision 8")])
def test_a_lost_link_logs_where_the_watch_resumes(
        caplog: pytest.LogCaptureFixture, revision: int, said: str) -> None:
    log = logging.getLogger("test.etcd_watch_log")
    failures = WatchFailures("127.0.0.1:2379", 3.0, log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert failures.interrupted(RegistryUnavailable("gone"), revision)
        assert not failures.interrupted(RegistryUnavailable("gone"), revision)  # logged once
    [record] = caplog.records
    assert said in record.getMessage()
    assert ("revision" in record.getMessage()) == bool(revision)
