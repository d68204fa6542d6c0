"""Whether a value read from the registry is one written here, as the layout carries it.

A layout may carry less than an instance: Nerve's record (``zk://…?format=nerve``,
:func:`discovery.model.nerve.as_read`) holds no schema, and meta under a reserved label name
comes back as another field or not at all. Comparing a written instance with its read as it
is would find every such instance changed at every read, and write it again, forever. Both
the agent's reconcile (:mod:`discovery.agent.registrations`) and the write-back
(:mod:`~discovery.registry.owned`) compare through :class:`ReadBack`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from discovery.model import Instance
from discovery.model.nerve import as_read
from discovery.registry.url import RegistryURL

Key = tuple[str, str]
#: an instance as a reader gets it back from the layout (None: it would not read)
Wire = Callable[[Instance], Instance | None]


def wire_of(url: RegistryURL | None) -> Wire | None:
    """The read-back of ``url``'s layout; None where the layout carries an instance whole."""
    return as_read if url is not None and url.nerve else None


class ReadBack:
    """Compares a written instance with one read, once through ``wire`` (None: as they are),
    apart from write stamps. The written instance's read-back is kept by key, for as long as
    that key's instance is the same object; ``live()``: the keys still worth keeping."""

    def __init__(self, wire: Wire | None, live: Callable[[], Collection[Key]]) -> None:
        self._wire, self._live = wire, live
        self._wired: dict[Key, tuple[Instance, Instance | None]] = {}  # written -> read back

    def same(self, written: Instance, seen: Instance) -> bool:
        """Whether ``seen`` is ``written`` as the layout carries it: writing ``written``
        again would change nothing a reader gets."""
        if self._wire is None:
            return written.same_registration(seen)
        hit = self._wired.get(written.key)
        if hit is None or hit[0] is not written:
            live = self._live()
            if len(self._wired) > 2 * len(live) + 64:  # keys no longer live: dropped
                self._wired = {k: v for k, v in self._wired.copy().items() if k in live}
            hit = (written, self._wire(written))
            self._wired[written.key] = hit
        return hit[1] is not None and hit[1].same_registration(seen)
