"""What an etcd watch (:mod:`~discovery.registry.etcd_watch`) needs from its registry."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from discovery.registry.base import Snapshot
    from discovery.registry.decoder import Decoder
    from discovery.registry.etcd_aio import AioChannels, LoopThread
    from discovery.registry.reads import ReadStats
    from discovery.registry.security import EtcdAuth
    from discovery.registry.url import RegistryURL


class WatchSource(Protocol):
    """What a watch needs from its registry (``EtcdRegistry``): where and how to connect,
    how to decode, and whom to tell that the connection came or went."""

    url: RegistryURL
    client: Any
    auth: EtcdAuth
    where: str
    decoder: Decoder
    reads: ReadStats
    channels: AioChannels

    @property
    def loop(self) -> LoopThread: ...

    def snapshot(self, services: Collection[str] | None = None) -> Snapshot: ...

    def revision(self) -> int: ...
    def set_state(self, up: bool) -> None: ...
    def members_in_use(self) -> set[str]: ...
