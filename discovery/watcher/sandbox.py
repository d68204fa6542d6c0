"""The sandbox an operator's HAProxy template renders in: what it may do, and for how long.

Jinja2's immutable sandbox lets a template read its context and nothing else (no attribute
walks to ``os``, no mutation). On top of it, a render is bounded: a template whose work grows
faster than the catalog (a loop over every instance inside another: 10,000 instances are 10^8
steps) would hold the watcher's thread for good once the catalog grows, and a registry grows on
every host at once. Every attribute, item and call a template makes, and every piece of its
output, counts; every ``_CHECK_EVERY`` of them the clock is read, and past ``RENDER_LIMIT_S``
the render stops with a :class:`TooLong` naming the line it was at; past ``MAX_RENDER_BYTES``
of output (characters, counted as the top level writes them) it stops too. The watcher logs it
and the last good config keeps serving, as for any bad template. Not bounded: a loop that
neither looks anything up nor writes (``{% if a == b %}`` on loop variables alone), and text a
macro, a ``{% set %}`` block or one expression builds before it is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from discovery.errors import RenderError

#: the longest a template may take to render, and the most it may write: a template whose work
#: grows faster than the catalog (a loop over every instance inside another) must not hold the
#: watcher for good when the catalog grows on every host at once; the last good config keeps
#: serving (the default template renders 10,000 instances in well under a second)
RENDER_LIMIT_S = 30.0
MAX_RENDER_BYTES = 64 * 1024 * 1024
_CHECK_EVERY = 256  # template operations (attribute, item, call) between looks at the clock


_DICT_ATTRIBUTES = frozenset(dir(dict))


class TooLong(RenderError):
    """A render ran past :data:`RENDER_LIMIT_S` or wrote more than :data:`MAX_RENDER_BYTES`."""


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with ``x.name`` on a plain dict (the context's every value) looked up at
    once: Jinja tries the attribute first and the item after its AttributeError, and a
    dict's attributes are those of its type, so the answer is the same (at 1,000 services
    x 10, ~150,000 lookups: the template took 0.18 s to render, 0.08 s this way)."""

    deadline = math.inf  # of the render under way (one at a time: Renderer's lock)
    limit = RENDER_LIMIT_S
    _ops = 0

    def tick(self) -> None:
        """One more operation: every ``_CHECK_EVERY``, past the deadline?"""
        self._ops += 1
        if not self._ops % _CHECK_EVERY and time.monotonic() > self.deadline:
            self._late()

    def _late(self) -> None:
        raise TooLong(f"still rendering after {self.limit:g} s, stopped here (does a loop over "
                      "the instances run inside another?)")

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._ops += 1  # tick(), inline: the commonest operation by far
        if not self._ops % _CHECK_EVERY and time.monotonic() > self.deadline:
            self._late()
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def bounded(self, template: jinja2.Template, context: Mapping[str, Any], limit: float) -> str:
        """``template`` rendered with ``context``; :class:`TooLong` past ``limit`` seconds or
        :data:`MAX_RENDER_BYTES` (one render at a time: the caller's lock)."""
        self.deadline, self.limit = time.monotonic() + limit, limit
        chunks: list[str] = []
        size = written = 0
        deadline, clock = self.deadline, time.monotonic
        try:  # Template.render, with the size counted as it grows
            for chunk in template.root_render_func(template.new_context(dict(context))):
                size += len(chunk)
                written += 1
                if size > MAX_RENDER_BYTES:
                    raise TooLong(f"wrote more than {MAX_RENDER_BYTES >> 20} MiB, stopped")
                if not written % _CHECK_EVERY and clock() > deadline:
                    self._late()  # a loop that only writes counts too
                chunks.append(chunk)
        except Exception:
            self.handle_exception()  # raises it again, its traceback naming template lines
        finally:
            self.deadline = math.inf
        return "".join(chunks)
