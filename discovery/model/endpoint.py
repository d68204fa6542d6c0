"""An instance's address and port, in the only form that reaches HAProxy, a socket command or
a DNS answer.

An :class:`Endpoint` can only hold a plain unicast IP address object (never a string: no
scope id, no spaces, no brackets of its own) and a port in 1..65535, so what it renders is
one token by construction, not by a list of forbidden characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.model import validate


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: validate.IP
    port: int

    def __post_init__(self) -> None:
        validate.unicast("endpoint", self.ip)
        validate.port("endpoint port", self.port)

    @classmethod
    def parse(cls, culprit: str, address: str, port: int) -> Endpoint:
        """``address`` (text) and ``port``, checked: one :class:`ValidationError` naming
        ``culprit`` otherwise."""
        return cls(validate.unicast_ip(f"{culprit} address", address),
                   validate.port(f"{culprit} port", port))

    @property
    def address(self) -> str:
        """The canonical address alone (``2001:db8::1``, ``192.0.2.1``)."""
        return str(self.ip)

    def __str__(self) -> str:
        """``ADDRESS:PORT``, IPv6 in brackets: HAProxy's ``server`` form."""
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"
