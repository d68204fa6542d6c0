"""Health history (agent/history.py) and persisted maintenance (agent/maint.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from discovery.agent.history import FLAP_COUNT, Cause, History
from discovery.agent.maint import Maintenance
from discovery.errors import ConfigError

IID = "n1:0123456789ab:80"


def test_transitions_with_causes_only_on_change() -> None:
    h = History()
    assert h.record("web", IID, "n1", "down", Cause("start"))
    assert not h.record("web", IID, "n1", "down", Cause("check_failed", "refused"))  # same state
    assert h.record("web", IID, "n1", "up", Cause("check_passed", "connected"))
    assert h.record("web", IID, "n1", "up", Cause("reregistered", "lease lost"))  # an event
    (item,) = h.query(IID)
    assert [(t["state"], t["cause"], t["output"]) for t in item["transitions"]] == [
        ("down", "start", ""), ("up", "check_passed", "connected"),
        ("up", "reregistered", "lease lost")]
    assert item["live"] and not item["flapping"] and item["state"] == "up"


def test_departed_history_is_kept_and_bounded() -> None:
    h = History(per_instance=3, departed=2)
    for n in range(5):
        h.record("web", IID, "n1", "up" if n % 2 else "down", Cause("check"))
    assert len(h.query(IID)[0]["transitions"]) == 3  # the last 3 only
    h.depart(IID, Cause("kill", "signal 15"))
    (gone,) = h.query(IID)
    assert not gone["live"] and gone["left_at"] and gone["state"] == "gone"
    assert gone["transitions"][-1]["cause"] == "kill"
    for n in range(3):
        other = f"n1:0123456789a{n}:80"
        h.record("api", other, "n1", "up", Cause("start"))
        h.depart(other, Cause("stop"))
    with pytest.raises(ConfigError, match="no history"):
        h.query(IID)  # pushed out: at most 2 departed are kept
    assert [i["id"] for i in h.query(service="api")] == ["n1:0123456789a2:80",
                                                          "n1:0123456789a1:80"]
    with pytest.raises(ConfigError, match="no instance of it"):
        h.query(service="nosuch")


def test_flapping_is_flagged() -> None:
    h = History()
    for n in range(FLAP_COUNT + 1):
        h.record("web", IID, "n1", "up" if n % 2 else "down", Cause("check"))
    assert not h.query(IID)[0]["flapping"]  # 5 changes (the first state is none): the limit
    h.record("web", IID, "n1", "up" if FLAP_COUNT % 2 == 0 else "down", Cause("check"))
    assert h.query(IID)[0]["flapping"] and h.flapping() == [IID]


def test_maintenance_survives_a_restart(tmp_path: Path) -> None:
    m = Maintenance(tmp_path / "state", "n1")
    m.set(IID, True)
    again = Maintenance(tmp_path / "state", "n1")
    assert again.active(IID) and not again.node
    again.set(None, True)
    again.set(IID, False)
    third = Maintenance(tmp_path / "state", "n1")
    assert third.node and third.ids == set()
    assert not Maintenance(tmp_path / "state", "n2").active(IID)  # per node


@pytest.mark.parametrize("content", ["{", "[]", '{"ids": ["not an id!"]}', '{"ids": 5}'])
def test_a_bad_maintenance_file_is_one_warning(tmp_path: Path, content: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "maintenance-n1.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        m = Maintenance(tmp_path, "n1")
    assert not m.node and m.ids == set()
    assert "ignored" in caplog.text


def test_maintenance_without_a_usable_state_dir_stays_in_memory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        m = Maintenance(blocker / "sub", "n1")
    m.set(IID, True)
    assert m.active(IID) and "will not survive" in caplog.text
