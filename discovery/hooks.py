"""Writing your own health-check type: everything a plugin needs, from one module.

A check type is a factory ``(CheckSpec, CheckTarget) -> Check`` published in the entry-point
group ``discovery.checks``; the entry point's name is the check type containers ask for with
the label ``discovery.check=<name>``. The agent runs it exactly like a built-in check: every
``interval`` seconds, ``rise`` successes in a row to register, ``fall`` failures in a row to
deregister. Two ways to write one (see docs/checks.md):

* a plain function and the :func:`check` decorator::

      from discovery.hooks import CheckSpec, CheckTarget, check

      @check("tcpbanner", required=("banner",))
      def tcpbanner(spec: CheckSpec, target: CheckTarget) -> tuple[bool, str]:
          ...

* a class: ``__init__(self, spec, target)`` validates (raising :class:`CheckError`), and
  ``run(self) -> CheckResult`` probes. It satisfies the :class:`Check` protocol.

Then, in the plugin's ``pyproject.toml``::

    [project.entry-points."discovery.checks"]
    tcpbanner = "my_package:tcpbanner"
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import TypeAlias

from discovery.agent.checks import ENTRY_POINT_GROUP, CheckFactory, clip
from discovery.agent.spec import Check, CheckResult, CheckSpec, CheckTarget
from discovery.errors import CheckError

log = logging.getLogger(__name__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Check",
    "CheckError",
    "CheckFactory",
    "CheckFunction",
    "CheckOutcome",
    "CheckResult",
    "CheckSpec",
    "CheckTarget",
    "FunctionCheck",
    "check",
    "clip",
    "outcome",
]

#: What a decorated check function may return.
CheckOutcome: TypeAlias = bool | CheckResult | tuple[bool, str]
#: A check function: probe ``target`` as ``spec`` says, within ``spec.timeout`` seconds.
CheckFunction: TypeAlias = Callable[[CheckSpec, CheckTarget], CheckOutcome]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Extra seconds a run may take beyond ``spec.timeout`` before it counts as timed out.
GRACE = 0.5


def outcome(value: object, name: str = "check") -> CheckResult:
    """Normalise what a check function returned into a :class:`CheckResult`.

    ``True``/``False`` -> ``CheckResult(ok, "ok"|"failed")``; ``(ok, text)`` ->
    ``CheckResult(ok, text)``; a ``CheckResult`` as it is (output clipped to one short line).
    Anything else is a failure saying what came back, so a forgotten ``return`` shows up.
    """
    if isinstance(value, CheckResult):
        return CheckResult(bool(value.ok), clip(str(value.output)))
    if isinstance(value, bool):
        return CheckResult(value, "ok" if value else "failed")
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bool)
            and isinstance(value[1], str)):
        return CheckResult(value[0], clip(value[1]))
    return CheckResult(False, clip(f"{name} check returned {type(value).__name__}, "
                                   "not bool, (bool, str) or CheckResult"))


class FunctionCheck:
    """A check factory made by :func:`check` from a function. Calling it with
    ``(spec, target)`` validates ``spec.params`` and returns a :class:`Check`.

    ``name`` is the check type's name (used in messages), ``func`` the undecorated function
    (handy in unit tests), ``required`` the ``spec.params`` keys that must be present.
    """

    def __init__(self, name: str, func: CheckFunction, required: tuple[str, ...] = ()) -> None:
        self.name, self.func, self.required = name, func, required
        functools.update_wrapper(self, func)

    def __call__(self, spec: CheckSpec, target: CheckTarget) -> Check:
        missing = [p for p in self.required if not str(spec.params.get(p) or "").strip()]
        if missing:
            labels = ", ".join(f"discovery.check.{p}" for p in missing)
            raise CheckError(f"{self.name} check needs {labels}")
        return _FunctionRun(self, spec, target)

    def __repr__(self) -> str:
        return f"<discovery check {self.name!r} from {getattr(self.func, '__qualname__', '?')}>"


class _FunctionRun:
    """One instance's check: calls the function with a deadline of ``timeout + GRACE``.

    The function runs on a helper thread. A call still running at the deadline is a failed
    run ("timed out"); while it keeps running, later runs fail at once rather than piling up
    threads. A hung probe therefore counts as failing, and ``fall`` of those deregister.
    """

    def __init__(self, factory: FunctionCheck, spec: CheckSpec, target: CheckTarget) -> None:
        self.factory, self.spec, self.target = factory, spec, target
        self._busy: threading.Thread | None = None

    def run(self) -> CheckResult:
        name, timeout = self.factory.name, self.spec.timeout
        if self._busy is not None and self._busy.is_alive():
            return CheckResult(False, f"{name} check still running from an earlier run")
        box: list[CheckResult] = []
        worker = threading.Thread(target=self._call, args=(box,), daemon=True,
                                  name=f"check-{name}-{self.target.container_id[:12]}")
        worker.start()
        worker.join(timeout + GRACE)
        if worker.is_alive():
            self._busy = worker
            return CheckResult(False, f"{name} check timed out after {timeout:g}s")
        return box[0] if box else CheckResult(False, f"{name} check ended without a result")

    def _call(self, box: list[CheckResult]) -> None:
        name = self.factory.name
        try:
            box.append(outcome(self.factory.func(self.spec, self.target), name))
        except Exception as exc:
            log.debug("%s check raised", name, exc_info=True)
            box.append(CheckResult(False, clip(f"{name} check raised "
                                               f"{type(exc).__name__}: {exc}")))

    def __repr__(self) -> str:
        return f"<{self.factory.name} check of {self.target.address}:{self.target.port}>"


def check(name: str, *, required: Iterable[str] = ()) -> Callable[[CheckFunction], FunctionCheck]:
    """Decorator: turn ``func(spec, target) -> bool | (bool, str) | CheckResult`` into a check
    factory the agent can load from entry-point group ``discovery.checks``.

    ``name`` should equal the entry point's name (it is what appears in messages).
    ``required`` lists ``spec.params`` keys (labels ``discovery.check.<key>``) that must be set:
    without them the check is refused when it is built, with a :class:`CheckError` naming them.

    The function is called every ``spec.interval`` seconds from a worker thread and should
    finish within ``spec.timeout`` (pass it on to sockets and HTTP clients); a call still running
    ``GRACE`` seconds later counts as a failure. An exception counts as a failure too, its
    message becoming the check's output.
    """
    if callable(name):
        raise CheckError("write @check(\"<type name>\", ...): the decorator needs the name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckError(f"check name {str(name)[:64]!r} must match {_NAME.pattern}")
    needed = (required,) if isinstance(required, str) else tuple(required)
    for param in needed:
        if not isinstance(param, str) or not param:
            raise CheckError(f"{name}: required parameter names must be non-empty strings")

    def decorate(func: CheckFunction) -> FunctionCheck:
        if not callable(func):
            raise CheckError(f"@check({name!r}) must decorate a function")
        return FunctionCheck(name, func, needed)

    return decorate
