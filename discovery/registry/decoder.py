"""The one path from a stored value to an :class:`Instance`, for every reader on every backend.

Every reader (the agent's reconcile, the watcher, DNS, HTTP, the client, ``discovery
services``/``show``) gets its instances from a backend's snapshot or watch, and every backend
decodes each value here. Whatever a value holds, :meth:`Decoder.decode` returns an Instance or
None: never an exception. A bad entry is skipped (a reader that had its instance keeps the last
good value: ``Snapshot.unreadable``) with one warning naming its key (escaped and
shortened: :func:`discovery.model.validate.shown`; a key is anyone's text), repeated at
most once per key per :data:`QUIET_S` seconds, and counted (``skipped``, served in /metrics as
``discovery_registry_invalid_records_total``). A ``zk://…?format=nerve`` registry's values are
Nerve's records (:func:`discovery.model.nerve.from_nerve`), under the same rules.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

from discovery.errors import InvalidRecord
from discovery.model import Instance
from discovery.model.nerve import from_nerve
from discovery.model.validate import shown
from discovery.registry.url import RegistryURL

log = logging.getLogger(__name__)

#: a key that stays bad is named in the log at most once per this many seconds
QUIET_S = 60.0
#: keys remembered for that (a 16-byte digest each, whatever the key's length); beyond it the
#: oldest are forgotten (so at worst warned again)
MAX_REMEMBERED = 10_000
#: the most characters of a skip's message in the log (its key is shown in at most 200)
MAX_MESSAGE = 1000
#: said of a value that does not decode (``Snapshot.unreadable``)
KEPT = "; a watcher that had its instance keeps the last good value until it is deleted"


class Decoder:
    """Decodes one registry's values (thread-safe); counts and rate-limits what it skips."""

    def __init__(self, url: RegistryURL, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.skipped = 0
        self._clock = clock
        self._warned: dict[bytes, float] = {}  # digest of a key -> when it was last named
        self._lock = threading.Lock()

    def decode(self, key: str, raw: bytes | None, stamp: float = 0.0) -> Instance | None:
        """The instance stored at ``key``; None for a key outside the layout (not ours to
        judge) or for a malformed value (skipped, counted, warned about). ``stamp``: when the
        value was written (Nerve's records carry no time of their own)."""
        split = self.url.split_key(key)
        if split is None:
            return None
        where = shown(key)  # escaped and shortened: a key is anyone's text (a log line too)
        if raw is None:
            self.skip(key, f"registry entry {where}: no value")
            return None
        try:
            if self.url.nerve:
                inst = from_nerve(raw, split[0], split[1], where=where, stamp=stamp)
                split = inst.key  # Nerve: the id comes from the node name and the port
            else:
                inst = Instance.from_json(raw, where=where)
        except InvalidRecord as exc:
            self.skip(key, f"registry entry skipped: {exc}{KEPT}")
            return None
        except Exception as exc:  # from_json promises InvalidRecord only; this is the backstop
            self.skip(key, f"registry entry {where} skipped: {type(exc).__name__}{KEPT}")
            return None
        if inst.key != split:
            self.skip(key, f"registry entry {where} holds {inst.service}/{inst.id}")
            return None
        return inst

    def denied(self, key: str) -> None:
        """``key`` (an entry, or a service's directory or prefix) may not be read by this
        client (ZooKeeper: its ACL, NoAuth; etcd: the user's role): skipped as a malformed
        entry is, counted, and named at most once a while."""
        why = ("its ACL: NoAuth" if self.url.scheme == "zk" else "permission denied: grant the "
               "registry user's role read on it, docs/security.md")
        self.skip(key, f"registry entry {shown(key)} skipped: the registry does not let this "
                       f"client read it ({why})")

    def skip(self, key: str, message: str) -> None:
        """``key`` is left out: counted, and ``message`` logged at most once a while (escaped
        and shortened: name ``key`` in it as :func:`~discovery.model.validate.shown` does)."""
        now = self._clock()
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        with self._lock:
            self.skipped += 1
            last = self._warned.get(digest)
            if last is not None and now - last < QUIET_S:
                return
            if len(self._warned) >= MAX_REMEMBERED:
                for old in sorted(self._warned, key=self._warned.__getitem__)[:MAX_REMEMBERED // 2]:
                    del self._warned[old]
            self._warned[digest] = now
        log.warning("%s (kept serving everything else; this key is named again in %.0f s at "
                    "the earliest)", shown(message, MAX_MESSAGE), QUIET_S)
