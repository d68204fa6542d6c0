"""The instance table of ``discovery services``: an IPv6 address in brackets."""

from __future__ import annotations

import io

from rich.console import Console

from discovery.cli import output
from discovery.model import Instance


def test_an_ipv6_address_is_bracketed_in_the_table() -> None:
    six = Instance(service="web", id="h:000000000001:8080", node="h", address="2001:db8::5",
                   port=8080)
    four = Instance(service="web", id="h:000000000002:8080", node="h", address="127.0.0.1",
                    port=8080)
    out = io.StringIO()
    output.as_table([six, four], Console(file=out, width=200), now=0.0)
    assert "[2001:db8::5]:8080" in out.getvalue() and "127.0.0.1:8080" in out.getvalue()
