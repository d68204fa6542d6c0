"""The registry interface every backend implements, and the URL that picks one.

Keys: ``<prefix>/services/<service>/<instance-id>`` holding an instance's JSON.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from discovery.errors import ConfigError, InvalidRecord
from discovery.model import Instance

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/discovery"
DEFAULT_PORTS = {"etcd": 2379, "zk": 2181}


@dataclass(frozen=True)
class RegistryURL:
    scheme: Literal["etcd", "zk"]
    hosts: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> RegistryURL:
        """``etcd://h1:2379,h2:2379/prefix`` or ``zk://h1:2181/prefix``."""
        if not url:
            raise ConfigError("registry URL is empty (set --registry or DISCOVERY_REGISTRY)")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"registry URL {url!r}: scheme must be etcd:// or zk://")
        hosts: list[tuple[str, int]] = []
        for item in parts.netloc.split(","):
            if not item:
                raise ConfigError(f"registry URL {url!r}: empty host")
            host, sep, port_s = item.rpartition(":")
            if not sep or "]" in port_s:
                host, port_s = item, str(DEFAULT_PORTS[scheme])
            host = host.strip("[]")
            if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise ConfigError(f"registry URL {url!r}: bad host:port {item!r}")
            hosts.append((host, int(port_s)))
        prefix = "/" + parts.path.strip("/") if parts.path.strip("/") else DEFAULT_PREFIX
        if any(c in prefix for c in "\x00\n\r ") or "//" in prefix:
            raise ConfigError(f"registry URL {url!r}: bad prefix {prefix!r}")
        return cls(scheme=scheme, hosts=tuple(hosts), prefix=prefix)  # type: ignore[arg-type]

    def __str__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.scheme}://{hosts}{self.prefix}"

    def service_dir(self, service: str) -> str:
        return f"{self.prefix}/services/{service}"

    def key(self, service: str, instance_id: str) -> str:
        return f"{self.service_dir(service)}/{instance_id}"

    def split_key(self, key: str) -> tuple[str, str] | None:
        """``(service, instance_id)`` of a key under this prefix, or None."""
        head = f"{self.prefix}/services/"
        if not key.startswith(head):
            return None
        parts = key[len(head):].split("/")
        if len(parts) != 2 or not all(parts):
            return None
        return parts[0], parts[1]


@dataclass(frozen=True)
class Snapshot:
    """Every valid instance in the registry, read at one point (``revision``)."""

    instances: dict[tuple[str, str], Instance] = field(default_factory=dict)
    revision: int = 0


@dataclass(frozen=True)
class Change:
    """One thing that happened in the registry.

    ``put``: ``instance`` was written. ``delete``: ``key`` is gone.
    ``reset``: the watch could not be resumed; ``snapshot`` is the whole new truth.
    """

    kind: Literal["put", "delete", "reset"]
    key: tuple[str, str] = ("", "")
    instance: Instance | None = None
    snapshot: Snapshot | None = None
    revision: int = 0


ChangeCallback = Callable[[Change], None]
StateCallback = Callable[[bool], None]


class Watch(Protocol):
    def stop(self) -> None: ...


class Registry(Protocol):
    """What every backend offers. All methods are thread-safe."""

    url: RegistryURL

    def register(self, instance: Instance) -> None:
        """Write (or overwrite) an instance owned by this process; it lives as long as we do."""

    def deregister(self, service: str, instance_id: str) -> None:
        """Remove an instance; removing a missing one is not an error."""

    def snapshot(self) -> Snapshot:
        """All valid instances, read consistently. Malformed entries are skipped with a warning."""

    def watch(self, callback: ChangeCallback, start_revision: int = 0) -> Watch:
        """Call ``callback`` for every change after ``start_revision`` until stopped.

        Survives disconnects: resumes where it left off, or sends a ``reset``.
        """

    def add_state_listener(self, callback: StateCallback) -> None:
        """Told True/False when the connection to the registry comes and goes."""

    def close(self, revoke: bool = True) -> None:
        """Stop everything; with ``revoke``, remove all this process registered."""


@contextmanager
def claiming(owned: dict[tuple[str, str], Instance], lock: AbstractContextManager[Any],
             instance: Instance) -> Iterator[None]:
    """Record ``instance`` as owned for the duration of a write; undo if the write fails."""
    with lock:
        previous = owned.get(instance.key)
        owned[instance.key] = instance
    try:
        yield
    except BaseException:
        with lock:
            if owned.get(instance.key) is instance:
                if previous is None:
                    del owned[instance.key]
                else:
                    owned[instance.key] = previous
        raise


def deliver(callback: ChangeCallback, change: Change, stopped: threading.Event) -> None:
    """Hand one change to a watch callback; a failing callback is logged, never fatal."""
    if stopped.is_set():
        return
    try:
        callback(change)
    except Exception:
        log.exception("registry watch callback failed on %s", change.kind)


def decode(url: RegistryURL, key: str, raw: bytes | None) -> Instance | None:
    """Decode one stored value; a malformed one is skipped with one warning naming the key."""
    split = url.split_key(key)
    if split is None:
        return None
    if raw is None:
        log.warning("registry entry %s has no value; skipped", key)
        return None
    try:
        inst = Instance.from_json(raw, where=key)
    except InvalidRecord as exc:
        log.warning("malformed registry entry skipped: %s", exc)
        return None
    if inst.key != split:
        log.warning("registry entry %s holds %s/%s; skipped", key, inst.service, inst.id)
        return None
    return inst
