"""Registry backends behind one small interface; :func:`open_registry` picks one by URL."""

from __future__ import annotations

from discovery.registry.base import Change, Registry, RegistryURL, Snapshot, Watch


def open_registry(url: str | RegistryURL, *, ttl: float = 10.0, timeout: float = 5.0) -> Registry:
    """Connect to ``etcd://`` or ``zk://``. ``ttl``: lease TTL / session timeout in seconds."""
    parsed = url if isinstance(url, RegistryURL) else RegistryURL.parse(url)
    if parsed.scheme == "etcd":
        from discovery.registry.etcd import EtcdRegistry

        return EtcdRegistry(parsed, ttl=ttl, timeout=timeout)
    from discovery.registry.zk import ZkRegistry

    return ZkRegistry(parsed, ttl=ttl, timeout=timeout)


__all__ = ["Change", "Registry", "RegistryURL", "Snapshot", "Watch", "open_registry"]
