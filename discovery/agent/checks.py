"""Health checks: built-in types and the ``discovery.checks`` entry-point plugins.

A check factory is called as ``factory(spec, target)`` and returns an object with
``run() -> CheckResult`` (see :class:`discovery.agent.spec.Check`). Factories are classes
or functions; third-party packages add their own through entry-point group
``discovery.checks``. A failed probe is a ``CheckResult(ok=False)``; a misconfigured
check raises :class:`~discovery.errors.CheckError` when it is built.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

import docker.errors
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ProxyError, SSLError

from discovery.agent.spec import Check, CheckResult, CheckSpec, CheckTarget
from discovery.errors import CheckError, DockerUnavailable
from discovery.model.validate import blank_unprintable

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "discovery.checks"
OUTPUT_LIMIT = 200
_EXEC_OUTPUT_LIMIT = 4096
#: seconds an outage of dockerd may keep exec checks' health states as they are (a restart
#: with live-restore, an upgrade: seconds; one that has not answered for this long has failed)
UNKNOWN_MAX_S = 120.0

CheckFactory = Callable[[CheckSpec, CheckTarget], Check]


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Make ``text`` safe to display on one line, at most ``limit``: no control, format/bidi
    (U+202E, U+200B), separator or other character the validators refuse (each a space)."""
    text = " ".join(blank_unprintable(text[: limit * 2]).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}")


@contextmanager
def deadline(seconds: float, cancel: Callable[[], None]) -> Iterator[threading.Event]:
    """Call ``cancel()`` from a timer thread if the block is still running after ``seconds``;
    yields an event that is set once it was. So a peer that trickles bytes cannot stretch a
    run past its timeout (a socket timeout bounds each read, not the whole exchange)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        try:
            cancel()
        except Exception:  # already closed, or a transport that cannot cancel
            log.debug("cannot cancel a check at its deadline", exc_info=True)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


# --- parameter parsing, shared with discovery.agent.labels -------------------------------

_STATUS_ITEM = re.compile(r"^([1-5])(?:([0-9])([0-9])|xx)$")


def status_matcher(value: str | None) -> Callable[[int], bool]:
    """``"200"``, ``"2xx"``, ``"200,204,3xx"`` -> predicate on a status code.

    ``None`` or empty means any 2xx or 3xx. Raises :class:`CheckError` for anything else.
    """
    if value is None or not value.strip():
        return lambda code: 200 <= code < 400
    exact: set[int] = set()
    classes: set[int] = set()
    for item in value.lower().split(","):
        m = _STATUS_ITEM.match(item.strip())
        if not m:
            raise CheckError(
                f"HTTP status {item.strip()[:16]!r} is not a code like 200 or a class like 2xx"
            )
        if m.group(2) is None:
            classes.add(int(m.group(1)))
        else:
            exact.add(int(item.strip()))
    return lambda code: code in exact or code // 100 in classes


def parse_command(value: str | None) -> list[str]:
    """An exec command: a JSON array of strings, or a string split like a POSIX shell
    would split words (no shell ever runs it). Raises :class:`CheckError`."""
    if value is None or not value.strip():
        raise CheckError("exec check needs a command (discovery.check.command)")
    if value.lstrip().startswith("["):
        try:
            argv = json.loads(value)
        except ValueError as exc:
            raise CheckError(f"command is not a JSON array: {exc}") from None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise CheckError("command JSON must be an array of strings")
    else:
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise CheckError(f"command cannot be split: {exc}") from None
    if not argv or not argv[0]:
        raise CheckError("command is empty")
    return argv


# --- built-in checks ----------------------------------------------------------------------


class TcpCheck:
    """Healthy when a TCP connection to the advertised address:port succeeds."""

    def __init__(self, spec: CheckSpec, target: CheckTarget) -> None:
        self.spec, self.target = spec, target

    def run(self) -> CheckResult:
        where = f"{self.target.address}:{self.target.port}"
        try:
            with socket.create_connection(
                (self.target.address, self.target.port), timeout=self.spec.timeout
            ):
                return CheckResult(True, f"connected to {where}")
        except OSError as exc:
            return CheckResult(False, clip(f"{where}: {_error(exc)}"))


class HttpCheck:
    """GET ``http://address:port<path>``; healthy when the status matches ``status``
    (default any 2xx/3xx). Params: ``path`` (default ``/``), ``status``."""

    def __init__(self, spec: CheckSpec, target: CheckTarget) -> None:
        self.spec, self.target = spec, target
        self.path = spec.params.get("path") or "/"
        if not self.path.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in self.path):
            raise CheckError(f"HTTP path {self.path[:64]!r} must start with / and have no spaces")
        self.matches = status_matcher(spec.params.get("status"))

    def run(self) -> CheckResult:
        conn = http.client.HTTPConnection(
            self.target.address, self.target.port, timeout=self.spec.timeout
        )

        def cancel() -> None:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)

        with deadline(self.spec.timeout, cancel) as timed_out:
            try:
                conn.request(
                    "GET",
                    self.path,
                    headers={"User-Agent": "discovery-check", "Connection": "close"},
                )
                resp = conn.getresponse()
                resp.read(_EXEC_OUTPUT_LIMIT)
                line = clip(f"HTTP {resp.status} {resp.reason}")
                return CheckResult(self.matches(resp.status) and not timed_out.is_set(), line)
            except (OSError, http.client.HTTPException) as exc:
                if timed_out.is_set():
                    return CheckResult(False, f"timed out after {self.spec.timeout:g}s")
                return CheckResult(False, _error(exc))
            finally:
                conn.close()


class ExecCheck:
    """Run ``command`` inside the container through the Docker exec API (never a shell
    on the host); healthy when it exits 0 within ``spec.timeout``.

    On timeout the check fails; Docker offers no way to kill an exec, so a hung command
    keeps running in the container until it ends by itself. Until it has, no new run starts
    (each run fails at once, logged once): a hung command never piles up processes.
    """

    def __init__(self, spec: CheckSpec, target: CheckTarget) -> None:
        self.spec, self.target = spec, target
        self.argv = parse_command(spec.params.get("command"))
        if target.docker is None:
            raise CheckError("exec check needs a Docker client")
        self._reach: DockerReach = target.reach if target.reach is not None else DockerReach()
        self._hung: str | None = None  # exec id of a timed-out run, maybe still running
        self._told = False  # logged that runs are skipped for self._hung

    def _previous_running(self, api: Any) -> bool:
        """Whether the timed-out previous run is still going (logged once per hung run)."""
        if self._hung is None:
            return False
        try:
            running = bool(api.exec_inspect(self._hung).get("Running"))
        except Exception:  # the exec (or the container) is gone: nothing left running
            running = False
        who = f"exec check of {self.target.container_id[:12]} ({clip(shlex.join(self.argv), 80)})"
        if running and not self._told:
            log.warning("%s: previous run still running; not starting another until it ends",
                        who)
            self._told = True
        elif not running:
            if self._told:
                log.info("%s: previous run ended; running again", who)
            self._hung, self._told = None, False
        return running

    def run(self) -> CheckResult:
        api = self.target.docker.api
        if self._previous_running(api):
            return CheckResult(False, "previous run still running: not started again")
        timed_out = threading.Event()  # set once the run's deadline closed its stream
        try:
            exec_id = api.exec_create(
                self.target.container_id, self.argv, stdout=True, stderr=True
            )["Id"]
            stream = api.exec_start(exec_id, stream=True)
            out = bytearray()
            with deadline(self.spec.timeout, stream.close) as timed_out:
                try:
                    for chunk in stream:
                        if len(out) < _EXEC_OUTPUT_LIMIT:
                            out += chunk[: _EXEC_OUTPUT_LIMIT - len(out)]
                finally:
                    stream.close()
            info = api.exec_inspect(exec_id)
            for _ in range(10):  # the stream can end a moment before dockerd records the exit
                if timed_out.is_set() or not info.get("Running"):
                    break
                time.sleep(0.02)
                info = api.exec_inspect(exec_id)
        except Exception as exc:  # docker.errors.APIError, requests errors, OSError, ...
            if timed_out.is_set() or not self._reach.unreachable(exc):  # (a timeout: failed)
                if isinstance(exc, docker.errors.APIError):  # dockerd answered: it is back
                    self._reach.reached()  # (else an outage's start stayed, and the next
                return CheckResult(False, _error(exc))  # one counted as failed at once)
            return CheckResult(False, clip(f"no result: dockerd unreachable ({_error(exc)})"),
                               unknown=True)
        self._reach.reached()
        text = out.decode("utf-8", "replace")
        if info.get("Running") or (timed_out.is_set() and info.get("ExitCode") is None):
            self._hung = exec_id
            return CheckResult(False, clip(f"timed out after {self.spec.timeout:g}s {text}"))
        code = info.get("ExitCode")
        return CheckResult(code == 0, clip(f"exit {code}: {text}" if text else f"exit {code}"))


class DockerReach:
    """Whether dockerd answers exec checks, told in the log once an outage, for all of an
    agent's checks (one a :class:`~discovery.agent.docker_source.DockerSource`).

    An ``exec`` run that cannot reach dockerd (refused, its socket gone: restarted, upgraded,
    with live-restore the containers go on serving) records no result: counted as a failure,
    every exec-checked instance of a host was deregistered after ``fall`` runs, on every host
    of a fleet-wide Docker upgrade. For :data:`UNKNOWN_MAX_S` at most: a dockerd that stays
    away (a failed upgrade) must not keep an app that died meanwhile registered for good; runs
    count as failures from then on. A failure dockerd answers (the container stopped: an
    ``APIError``), a non-zero exit, a timeout in the container, and a TLS or proxy error (an
    expired client certificate: no restart) still count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._since: float | None = None  # when the outage began (None: dockerd answers)
        self._told_long = False

    def unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` says dockerd could not be reached, for no longer than
        :data:`UNKNOWN_MAX_S` (logged at the outage's first, and once past that)."""
        if not isinstance(exc, RequestsConnectionError | ConnectionError | DockerUnavailable) \
                or isinstance(exc, SSLError | ProxyError):
            return False
        now = self._clock()
        with self._lock:
            first = self._since is None
            if first:
                self._since, self._told_long = now, False
            assert self._since is not None
            long = now - self._since > UNKNOWN_MAX_S
            tell_long, self._told_long = long and not self._told_long, self._told_long or long
        if first:
            log.warning("dockerd unreachable (%s): exec checks record no result until it "
                        "answers (health states kept), %g s at most", _error(exc), UNKNOWN_MAX_S)
        if tell_long:
            log.warning("dockerd unreachable for over %g s: exec checks count as failed again",
                        UNKNOWN_MAX_S)
        return not long

    def reached(self) -> None:
        """An exec run reached dockerd."""
        if self._since is not None:
            with self._lock:
                back, self._since = self._since is not None, None
            if back:
                log.info("dockerd answers again: exec checks count again")


class DockerCheck:
    """Follow the container's own HEALTHCHECK: healthy when Docker says ``healthy``."""

    def __init__(self, spec: CheckSpec, target: CheckTarget) -> None:
        self.spec, self.target = spec, target
        if target.docker is None:
            raise CheckError("docker check needs a Docker client")

    def run(self) -> CheckResult:
        try:
            attrs = self.target.docker.api.inspect_container(self.target.container_id)
        except Exception as exc:
            return CheckResult(False, _error(exc))
        health = (attrs.get("State") or {}).get("Health") or {}
        status = str(health.get("Status") or "none")
        logs = health.get("Log") or []
        last = str(logs[-1].get("Output", "")) if logs and isinstance(logs[-1], dict) else ""
        return CheckResult(status == "healthy", clip(f"docker health {status} {last}".strip()))


class NoneCheck:
    """Always healthy: register as soon as the container runs."""

    def __init__(self, spec: CheckSpec, target: CheckTarget) -> None:
        self.spec, self.target = spec, target

    def run(self) -> CheckResult:
        return CheckResult(True, "no check")


BUILTIN_CHECKS: dict[str, CheckFactory] = {
    "tcp": TcpCheck,
    "http": HttpCheck,
    "exec": ExecCheck,
    "none": NoneCheck,
    "docker": DockerCheck,
}


def _plugins() -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not break discovery
        log.warning("cannot list entry points in %s", ENTRY_POINT_GROUP, exc_info=True)
        return {}


def CHECK_TYPES() -> frozenset[str]:  # upper case: the name labels.py was promised
    """Every check type name that :func:`load_check_factory` can resolve."""
    return frozenset(BUILTIN_CHECKS) | frozenset(_plugins())


def load_check_factory(type_name: str) -> CheckFactory:
    """The factory for check type ``type_name``: a built-in, or an entry point in group
    ``discovery.checks`` (a class or function ``(CheckSpec, CheckTarget) -> Check``).
    Raises :class:`CheckError` for unknown or unloadable types."""
    if type_name in BUILTIN_CHECKS:
        return BUILTIN_CHECKS[type_name]
    ep = _plugins().get(type_name)
    if ep is None:
        known = ", ".join(sorted(CHECK_TYPES()))
        raise CheckError(f"unknown check type {type_name[:64]!r} (known: {known})")
    try:
        factory = ep.load()
    except Exception as exc:
        raise CheckError(f"check plugin {type_name!r} ({ep.value}) fails to load: {exc}") from exc
    if not callable(factory):
        raise CheckError(f"check plugin {type_name!r} ({ep.value}) is not callable")
    return factory


def build_check(spec: CheckSpec, target: CheckTarget) -> Check:
    """Resolve ``spec.type`` and build the check; any failure is a :class:`CheckError`."""
    factory = load_check_factory(spec.type)
    try:
        return factory(spec, target)
    except CheckError:
        raise
    except Exception as exc:
        raise CheckError(f"cannot build {spec.type} check: {_error(exc)}") from exc
