"""Check type ``httpbody``: healthy while ``GET http://<address>:<port><path>`` answers 2xx
with a body that contains a given string.

Container labels::

    discovery.check=httpbody
    discovery.check.contains=ready     # required: the text the body must contain
    discovery.check.path=/health       # optional, default /
    discovery.check.interval=2s  discovery.check.timeout=1s
    discovery.check.rise=2       discovery.check.fall=3

Useful when a service answers 200 while it is still warming up or degraded, and says so
in the body.
"""

from __future__ import annotations

import http.client

from discovery.hooks import CheckSpec, CheckTarget, check

#: At most this much of the body is read and searched.
MAX_BODY = 64 * 1024


@check("httpbody", required=("contains",))
def httpbody(spec: CheckSpec, target: CheckTarget) -> tuple[bool, str]:
    """GET the path; ok when the status is 2xx and the body contains ``contains``."""
    path = spec.params.get("path") or "/"
    wanted = spec.params["contains"]
    if not path.startswith("/") or any(c.isspace() for c in path):
        return False, f"bad path {path[:64]!r}: must start with / and have no spaces"
    conn = http.client.HTTPConnection(target.address, target.port, timeout=spec.timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "discovery-check-httpbody"})
        resp = conn.getresponse()
        body = resp.read(MAX_BODY).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET {path}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        return False, f"GET {path}: HTTP {resp.status}"
    if wanted not in body:
        return False, f"GET {path}: HTTP {resp.status}, body lacks {wanted!r}"
    return True, f"GET {path}: HTTP {resp.status}, body has {wanted!r}"
