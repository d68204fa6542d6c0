"""Maintenance state of one agent's node (``discovery maint``), persisted so that it survives
an agent restart: ``<state-dir>/maintenance-<node>.json`` holds
``{"node": bool, "ids": [instance ids]}``, written atomically on every change.

Without a usable state dir the state lives in memory only (one warning). An unreadable or
malformed file is one warning and an empty state, never a crash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from discovery.errors import ValidationError
from discovery.files import write_atomic
from discovery.model import validate as v

log = logging.getLogger(__name__)

MAX_IDS = 10_000  # ids kept in the file (the oldest beyond it are dropped)


class Maintenance:
    """Which instances of this node are in maintenance (and whether the whole node is)."""

    def __init__(self, state_dir: str | Path | None, node: str) -> None:
        self.node = False
        self.ids: set[str] = set()
        self.path: Path | None = None
        if state_dir:
            folder = Path(state_dir)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.path = folder / f"maintenance-{node}.json"
            except OSError as exc:
                log.warning("state dir %s unusable (%s): maintenance will not survive a "
                            "restart", folder, exc.strerror or exc)
        self._load()

    def active(self, instance_id: str) -> bool:
        return self.node or instance_id in self.ids

    def set(self, instance_id: str | None, on: bool) -> None:
        """Maintenance on/off for one instance, or (None) the whole node; saved at once."""
        if instance_id is None:
            self.node = on
        elif on:
            self.ids.add(instance_id)
        else:
            self.ids.discard(instance_id)
        self._save()

    def containers(self) -> frozenset[str]:
        """The containers (their short ids) of the instances in maintenance."""
        return frozenset(c for i in self.ids if (c := _container(i)) is not None)

    def forget(self, container_id: str) -> None:
        """The container removed: its instances' ids (``<node>:<cid>:<port>``) never come
        back, so they are dropped (saved if any); they were kept up to MAX_IDS, for good."""
        short = container_id[:12].lower()
        gone = {i for i in self.ids if _container(i) == short}
        if gone:
            self.ids -= gone
            self._save()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text()[:1_000_000])
            if not isinstance(data, dict) or not isinstance(data.get("ids", []), list):
                raise ValueError("not {\"node\": bool, \"ids\": [...]}")
            self.node = data.get("node") is True
            self.ids = {v.instance_id("ids", i) for i in data.get("ids", [])[:MAX_IDS]
                        if isinstance(i, str)}
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("%s: ignored (%s): starting with no maintenance", self.path, exc)
            self.node, self.ids = False, set()
            return
        if self.node or self.ids:
            log.info("maintenance restored from %s: %s", self.path,
                     "whole node" if self.node else ", ".join(sorted(self.ids)[:10]))

    def _save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"node": self.node, "ids": sorted(self.ids)[:MAX_IDS]}) + "\n"
        try:
            write_atomic(self.path, text)
        except OSError as exc:
            log.warning("%s: not saved (%s): maintenance will not survive a restart",
                        self.path, exc.strerror or exc)


def _container(instance_id: str) -> str | None:
    """The container (short id) an instance id of ours names (``<node>:<cid>:<port>``)."""
    parts = instance_id.rsplit(":", 2)
    return parts[1] if len(parts) == 3 else None
