"""discovery: health-aware service discovery for Docker hosts (etcd v3 / ZooKeeper + HAProxy).

``from discovery import Client`` loads the client lazily, so ``import discovery`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from discovery.client import Client

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from discovery.client import Client

        return Client
    raise AttributeError(f"module 'discovery' has no attribute {name!r}")
