"""The one exception hierarchy of discovery.

Every error we raise on purpose derives from :class:`DiscoveryError`, so a caller
(the CLI, the agent loop) can catch that one type and print one clear line.
"""

from __future__ import annotations


class DiscoveryError(Exception):
    """Base of every error discovery raises on purpose."""


class ConfigError(DiscoveryError):
    """A flag, env var, URL or config file is wrong."""


class ValidationError(DiscoveryError):
    """A value (label, record field) failed validation. ``culprit`` names it."""

    def __init__(self, culprit: str, reason: str) -> None:
        super().__init__(f"{culprit}: {reason}")
        self.culprit = culprit
        self.reason = reason


class LabelError(ValidationError):
    """A container label or env var cannot be used; the container is skipped."""


class InvalidRecord(ValidationError):
    """A record read from the registry is malformed; it is skipped."""


class RegistryError(DiscoveryError):
    """The registry cannot be reached or refused an operation."""


class RegistryUnavailable(RegistryError):
    """No member of the registry cluster answered."""


class RegistryDenied(RegistryError):
    """The registry answered that this client may not read or write there (etcd: permission
    denied)."""


class LoginRefused(RegistryError):
    """etcd refused this client's login for its credentials, or did so before and is not
    asked again yet: ``retry_in`` seconds until it is."""

    def __init__(self, message: str, retry_in: float = 0.0) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class CheckError(DiscoveryError):
    """A health check is misconfigured (not: a check that failed)."""


class DockerUnavailable(DiscoveryError):
    """dockerd cannot be reached."""


class HAProxyError(DiscoveryError):
    """HAProxy refused a runtime command, failed to start or reload, or is unreachable."""


class HAProxyCommandError(HAProxyError):
    """Some commands of a runtime-API batch were refused; the rest of the batch ran.

    ``failures`` lists (command, HAProxy's answer); ``answers`` has every answer in order.
    """

    def __init__(self, failures: list[tuple[str, str]], answers: list[str]) -> None:
        shown = "; ".join(f"{cmd}: {why}" for cmd, why in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {len(answers)} commands refused: {shown}{more}")
        self.failures = failures
        self.answers = answers


class RenderError(DiscoveryError):
    """A template failed to render, or the rendered config failed validation."""
