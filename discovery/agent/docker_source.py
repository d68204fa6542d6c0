"""Follows dockerd: subscribe to events first, then list containers, so nothing falls in between.

Never gives up: when the stream breaks or dockerd restarts it reconnects with backoff,
replays events ``since`` the last one seen, and hands the agent a full list again (a replayed
pause, unpause or health status older than that list is not handed on: the list shows it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import docker
from docker.errors import DockerException, NotFound
from requests.exceptions import RequestException

from discovery.agent.checks import DockerReach
from discovery.agent.spec import CheckTarget
from discovery.errors import DockerUnavailable
from discovery.retry import backoff

log = logging.getLogger(__name__)

EVENTS = ("start", "restart", "health_status", "kill", "stop", "die", "destroy", "pause", "unpause",
          "rename")

#: what a listing shows of itself: a replayed one older than the listing is not handed on (it
#: was a flap: a pause and unpause during an outage took the container out and back in)
SHOWN_BY_LISTING = ("pause", "unpause", "health_status")

EventCallback = Callable[[dict[str, Any]], None]
SyncCallback = Callable[[list[dict[str, Any]]], None]
StateCallback = Callable[[bool], None]


def event_fields(event: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A Docker event's action (``health_status: healthy``), container id and attributes."""
    actor = event.get("Actor") or {}
    return (str(event.get("Action") or event.get("status") or ""),
            str(event.get("id") or actor.get("ID", "")), actor.get("Attributes") or {})


class StreamClosed(DockerUnavailable):
    """The event stream ended: dockerd went away or closed it."""


class DockerSource:
    def __init__(
        self,
        base_url: str | None,
        on_event: EventCallback,
        on_sync: SyncCallback,
        on_state: StateCallback | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._on_event = on_event
        self._on_sync = on_sync
        self._on_state = on_state or (lambda _up: None)
        self._timeout = timeout
        self._stop = threading.Event()
        self._since: int | None = None  # unix seconds of the last event seen
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        # connected by the event loop (dockerd may be down at start: waited for, not fatal)
        self._client: docker.DockerClient | None = None
        self.connected = False
        self._clock_warned = False  # (once: _now_ns)
        self.reach = DockerReach()  # whether exec checks reach dockerd (one warning an outage)

    def check_target(self, address: str, port: int, container_id: str) -> CheckTarget:
        """What a check of ``container_id`` probes (exec: through this dockerd)."""
        return CheckTarget(address, port, container_id, self.client, self.reach)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise DockerUnavailable("docker: not connected yet")
        return self._client

    def _connect(self) -> docker.DockerClient:
        if self._base_url:
            return docker.DockerClient(base_url=self._base_url, timeout=self._timeout)
        return docker.from_env(timeout=self._timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a dead stream may raise anything
                stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        """Current state of a container, or None when it is gone."""
        try:
            attrs: dict[str, Any] = self.client.api.inspect_container(container_id)
            return attrs
        except NotFound:
            return None
        except (DockerException, RequestException) as exc:
            raise DockerUnavailable(f"docker inspect {container_id[:12]}: {exc}") from exc

    def _now_ns(self) -> int:
        """dockerd's time now, in ns (its clock: a remote dockerd's may differ from ours); ours
        when it does not say (a local dockerd's is the same), with one warning."""
        try:
            return int(datetime.fromisoformat(str(self.client.api.info()["SystemTime"]))
                       .timestamp() * 1e9)
        except (DockerException, RequestException, ValueError, KeyError, TypeError) as exc:
            if not self._clock_warned:
                log.warning("docker: its clock not told (%s); replayed events are compared "
                            "with ours", str(exc) or type(exc).__name__)
                self._clock_warned = True
            return time.time_ns()

    def list_running(self) -> list[dict[str, Any]]:
        """Inspect data of every running container; raises :class:`DockerUnavailable`."""
        try:
            listed = self.client.api.containers()
        except (DockerException, RequestException) as exc:
            raise DockerUnavailable(f"docker ps: {exc}") from exc
        out = []
        for c in listed:
            attrs = self.inspect(c["Id"])
            if attrs is not None:
                out.append(attrs)
        return out

    def _run(self) -> None:
        retrying = backoff((DockerException, RequestException, DockerUnavailable,
                            OSError), stop_event=self._stop, what="docker: reconnecting",
                           logger=log)
        try:
            for attempt in retrying:
                with attempt:
                    try:
                        self._session()
                    except Exception:
                        self._lost()
                        raise
        except Exception:  # only reached when stopping; anything else is logged and retried
            if not self._stop.is_set():
                log.exception("docker event loop ended unexpectedly")

    def _lost(self) -> None:
        if self.connected:
            self.connected = False
            self._on_state(False)

    def _session(self) -> None:
        """One connection's life: subscribe, list, then follow until the stream ends."""
        if self._stop.is_set():
            return
        self._client = self._connect()
        filters = {"type": ["container"], "event": list(EVENTS)}
        stream = self.client.api.events(since=self._since, decode=True, filters=filters)
        self._stream = stream
        listed_ns = self._now_ns()
        running = self.list_running()
        if not self.connected:
            self.connected = True
            self._on_state(True)
        log.info("docker: connected, %d running containers", len(running))
        try:
            self._on_sync(running)
        except DockerUnavailable:
            raise
        except Exception:  # a bug in handling must not end the event loop: log, carry on
            log.exception("docker: handling the container list failed")
        for event in stream:
            if self._stop.is_set():
                return
            self._since = int(event.get("time", self._since or 0))
            if (event_fields(event)[0].partition(":")[0] in SHOWN_BY_LISTING
                    and int(event.get("timeNano") or listed_ns) < listed_ns):
                continue
            try:
                self._on_event(event)
            except DockerUnavailable:
                raise
            except Exception:
                log.exception("docker: handling %s event failed", event.get("Action"))
        if not self._stop.is_set():
            raise StreamClosed("event stream closed")
