"""Registry backends behind one small interface; :func:`open_registry` picks one by URL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from discovery.registry.base import Change, Registry, Snapshot, Watch
from discovery.registry.url import RegistryURL, mask_url

if TYPE_CHECKING:
    from discovery.registry.etcd_aio import LoopThread


def open_registry(url: str | RegistryURL, *, ttl: float = 10.0, timeout: float = 5.0,
                  environ: Mapping[str, str] | None = None,
                  loop: LoopThread | None = None) -> Registry:
    """Connect to ``etcd://`` or ``zk://``. ``ttl``: lease TTL / session timeout in seconds.

    What the URL leaves out of user, password and TLS files is taken from
    ``DISCOVERY_REGISTRY_{USER,PASSWORD,PASSWORD_FILE,CA,CERT,KEY}`` in ``environ`` (default:
    ``os.environ``, read now); the files are read now too (ConfigError when one cannot be).
    ``loop``: etcd only, the asyncio loop thread its calls and its watch and keepalive streams
    run on; a process holding many registries shares one (default: the registry starts its
    own at its first call or stream).
    """
    parsed = url if isinstance(url, RegistryURL) else RegistryURL.parse(url)
    parsed = parsed.with_env(environ)
    if parsed.scheme == "etcd":
        from discovery.registry.etcd import EtcdRegistry

        return EtcdRegistry(parsed, ttl=ttl, timeout=timeout, loop=loop)
    from discovery.registry.zk import ZkRegistry

    return ZkRegistry(parsed, ttl=ttl, timeout=timeout)


__all__ = ["Change", "Registry", "RegistryURL", "Snapshot", "Watch", "mask_url", "open_registry"]
