"""discovery: health-aware service discovery for Docker hosts (etcd v3 / ZooKeeper + HAProxy)."""

__version__ = "0.1.0"
