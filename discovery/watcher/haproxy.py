"""Clients for HAProxy's runtime API (stats socket, level admin) and master CLI.

Commands are built and answers judged by pure functions here (``slot_commands``,
``batch_commands``, ``response_error``), answers parsed by those of
:mod:`~discovery.watcher.haproxy_proc`, so all of it is unit tested on captured outputs.
Every failure is an :class:`~discovery.errors.HAProxyError`; a batch with refused commands
raises :class:`~discovery.errors.HAProxyCommandError` after running the rest of the batch.

Nothing containing a newline, ``;`` or another control character is ever sent: HAProxy
would treat it as a command separator.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Mapping, Sequence

from discovery.errors import HAProxyCommandError, HAProxyError, ValidationError
from discovery.model.endpoint import Endpoint
from discovery.retry import backoff, poll
from discovery.watcher.haproxy_proc import (
    ServerView,
    ShowProc,
    parse_info,
    parse_servers_state,
    parse_show_proc,
    parse_stat,
    server_view,
)
from discovery.watcher.slots import Slot

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # fullmatch: "$" would let a trailing newline in
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f;]")
_PROMPT = b"\n> "
MAX_WEIGHT = 256
#: ``set server`` commands sent at once before their answers are read (one round trip each
#: took 36 us: a host's 1,000 instances gone at once, 3,000 commands, 109 ms)
SLOT_BATCH = 100
# First words of HAProxy's CLI refusals (2.6): "No such server.", "Unknown command, ...",
# "Require 'backend/server'.", "Invalid addr ...", "Permission denied", "Can't find ...".
_ERROR_START = re.compile(r"^(no such|unknown|require|invalid|permission denied|can't|cannot|"
                          r"missing|empty|failed|unable|.* expects |.* can only be|"
                          r".*not found|.*error)", re.IGNORECASE)
_ADDR_OK = re.compile(r"(ip changed from|port changed from|no need to change)", re.IGNORECASE)
# These print nothing on success (but "set server ... addr", handled apart).
_SILENT_ON_SUCCESS = ("set ", "enable ", "disable ", "clear ", "shutdown ")


def check_command(cmd: str) -> str:
    """Return ``cmd`` stripped, or raise HAProxyError if it is empty or has a separator."""
    if _FORBIDDEN.search(cmd):
        raise HAProxyError(f"refusing to send {cmd!r}: newline, ';' or control character")
    cmd = cmd.strip()
    if not cmd:
        raise HAProxyError("refusing to send an empty command")
    return cmd


def response_error(cmd: str, text: str) -> str | None:
    """HAProxy's refusal in ``text`` (the answer to ``cmd``), or None if it succeeded."""
    body = text.strip()
    if not body:
        return None
    first = body.splitlines()[0].strip()
    low = cmd.strip().lower()
    if low.startswith("set server ") and " addr " in f" {low} ":
        return None if _ADDR_OK.search(first) else first
    if low.startswith(_SILENT_ON_SUCCESS):
        return first  # these commands print nothing when they succeed
    return first if _ERROR_START.match(first) else None


def _check_name(what: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise HAProxyError(f"invalid {what} name {value!r}")
    return value


def slot_commands(backend: str, slot: Slot) -> list[str]:
    """The ``set server`` commands that make ``backend/slot.name`` look like ``slot``.

    Order is safe for traffic: a slot going to maint is taken out first and re-pointed
    after; a slot going ready/drain is re-pointed and weighted first, then enabled.
    """
    target = f"{_check_name('backend', backend)}/{_check_name('server', slot.name)}"
    try:  # HAProxy itself silently wraps port 99999 to 34463: the Endpoint refuses it
        endpoint = Endpoint.parse(target, slot.address, slot.port)
    except ValidationError as exc:
        raise HAProxyError(str(exc)) from None
    if not 0 <= slot.weight <= MAX_WEIGHT:
        raise HAProxyError(f"{target}: weight {slot.weight} out of range 0..{MAX_WEIGHT}")
    if slot.state not in ("ready", "drain", "maint"):
        raise HAProxyError(f"{target}: unknown state {slot.state!r}")
    point = [f"set server {target} addr {endpoint.address} port {endpoint.port}",
             f"set server {target} weight {slot.weight}"]
    state = f"set server {target} state {slot.state}"
    return [state, *point] if slot.state == "maint" else [*point, state]


def batch_commands(changes: Mapping[str, Sequence[Slot]]) -> list[str]:
    """Every backend's :func:`slot_commands`, in its slots' order, except that a backend
    whose slots all go to maint (a dead host's instances) is out of service first: each
    such slot's ``state maint`` comes before any slot is re-pointed. A backend with an add
    and a removal together keeps its order (no moment with fewer servers than it allows)."""
    first: list[str] = []
    rest: list[str] = []
    for backend, slots in changes.items():
        per_slot = [slot_commands(backend, s) for s in slots]
        removals_only = all(s.state == "maint" for s in slots)
        first += [c[0] for c in per_slot] if removals_only else []
        rest += [x for c in per_slot for x in (c[1:] if removals_only else c)]
    return first + rest


class _MasterReset(HAProxyError):
    """The master CLI reset a read-only connection (it does, briefly, around (re)starts)."""


class _UnixCLI:
    """``connect_grace``: keep retrying a refused/missing socket this long (seconds)."""

    label = ""

    def __init__(self, socket_path: str, timeout: float = 2.0,
                 connect_grace: float = 0.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout, self.connect_grace = timeout, connect_grace

    def _connect(self, what: str) -> socket.socket:
        try:
            for attempt in backoff((ConnectionRefusedError, FileNotFoundError),
                                   timeout=self.connect_grace, initial=0.02, maximum=0.02,
                                   jitter=0):
                with attempt:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout)
                    try:
                        sock.connect(self.socket_path)
                    except OSError:
                        sock.close()
                        raise
        except OSError as exc:
            raise HAProxyError(f"{what}: cannot reach {self.socket_path}: {exc}") from exc
        return sock

    def _raw(self, cmd: str) -> str:
        """Send one command, read the answer until HAProxy closes the connection."""
        cmd = check_command(cmd)
        chunks: list[bytes] = []
        with self._connect(cmd) as sock:
            try:
                sock.sendall(cmd.encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)  # the master CLI answers only then
                while data := sock.recv(65536):
                    chunks.append(data)
            except OSError as exc:
                raise HAProxyError(f"{cmd}: {self.socket_path}: {exc}") from exc
        return b"".join(chunks).decode(errors="replace")

    def command(self, cmd: str) -> str:
        """Run one command; HAProxyError naming it if HAProxy refuses it."""
        text = self._raw(cmd)
        error = response_error(cmd, text)
        if error is not None:
            raise HAProxyError(f"{self.label}{cmd.strip()}: {error}")
        return text


class HAProxyRuntime(_UnixCLI):
    """The runtime API on a stats socket with ``level admin``: ``HAProxyRuntime(path)``."""

    def commands(self, cmds: Sequence[str], batch: int = 1) -> list[str]:
        """Run ``cmds`` in order over ONE connection (interactive ``prompt`` mode), sent
        ``batch`` at a time before their answers are read: HAProxy answers them in order.
        Batch only commands whose answers are short (``set server``: a line at most): a
        batch's answers must fit the socket's buffers, which nobody reads while it is sent.

        Every command runs even if an earlier one is refused; the refused ones are then
        reported together in a HAProxyCommandError. Returns the answers, in order.
        """
        checked = [check_command(c) for c in cmds]
        if not checked:
            return []
        answers: list[str] = []
        failures: list[tuple[str, str]] = []
        with self._connect(checked[0]) as sock:
            buf = bytearray()
            try:
                sock.sendall(b"prompt\n")
                self._until_prompt(sock, buf)
                step = max(1, batch)
                for i in range(0, len(checked), step):
                    part = checked[i:i + step]
                    sock.sendall(b"".join(cmd.encode() + b"\n" for cmd in part))
                    for cmd in part:
                        text = self._until_prompt(sock, buf)
                        answers.append(text)
                        error = response_error(cmd, text)
                        if error is not None:
                            failures.append((cmd, error))
                sock.sendall(b"quit\n")
            except OSError as exc:
                done = len(answers)
                raise HAProxyError(f"{self.socket_path}: connection failed after {done} of "
                                   f"{len(checked)} commands: {exc}") from exc
        if failures:
            raise HAProxyCommandError(failures, answers)
        return answers

    @staticmethod
    def _until_prompt(sock: socket.socket, buf: bytearray) -> str:
        """The next answer: what comes before the next prompt (``buf`` keeps what follows,
        the answers of the rest of a batch)."""
        while (end := buf.find(_PROMPT)) < 0:
            data = sock.recv(65536)
            if not data:
                raise OSError("HAProxy closed the connection")
            buf += data
        text = bytes(buf[:end]).decode(errors="replace")
        del buf[:end + len(_PROMPT)]
        return text.strip("\n") + "\n" if text.strip() else ""

    @staticmethod
    def apply_slot(backend: str, slot: Slot) -> list[str]:
        """The commands for one slot (see :func:`slot_commands`); nothing is sent."""
        return slot_commands(backend, slot)

    def apply_slots(self, changes: Mapping[str, Sequence[Slot]]) -> list[str]:
        """Apply slot changes for many backends in one connection; returns the commands."""
        cmds = batch_commands(changes)
        started = time.monotonic()
        self.commands(cmds, batch=SLOT_BATCH)
        log.debug("applied %d commands in %.1f ms", len(cmds),
                  (time.monotonic() - started) * 1000)
        return cmds

    def servers_state(self, backend: str | None = None) -> dict[tuple[str, str], dict[str, str]]:
        cmd = "show servers state" + (f" {_check_name('backend', backend)}" if backend else "")
        return parse_servers_state(self.command(cmd))

    def servers(self, backend: str | None = None) -> dict[tuple[str, str], ServerView]:
        """``show servers state`` as {(backend, server): ServerView}."""
        return {k: server_view(v) for k, v in self.servers_state(backend).items()}

    def slots(self, backend: str) -> dict[str, ServerView]:
        """The servers of one backend by name: ``rt.slots("web")["s3"].state == "ready"``."""
        return {srv: view for (_, srv), view in self.servers(backend).items()}

    def stat(self, backend: str | None = None) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` of every server, or of ``backend``'s: {(backend, server): {CSV field:
        value}} (``scur``: current sessions, ``status``: UP/DOWN/MAINT/DRAIN/no check). One
        backend's is what a sync needs: every server's is ~0.5 s at 1,000 services. Read raw:
        its header names fields like ``h2_..._errors``, which :func:`response_error` would
        take for one."""
        named = backend is not None and _NAME.fullmatch(backend) and not backend.isdigit()
        proxy = backend if named else "-1"  # a number would name a proxy id
        return parse_stat(self._raw(f"show stat {proxy} 4 -1"))

    def info(self) -> dict[str, str]:
        return parse_info(self.command("show info"))

    def pid(self) -> int:
        """Pid of the worker answering on this socket."""
        return int(self.info()["Pid"])


class HAProxyMaster(_UnixCLI):
    """The master CLI (``haproxy -W -S <socket>``).

    It refuses connections for a moment while the master re-executes itself (during any
    reload), so connecting is retried for ``connect_grace`` seconds by default.
    """

    label = "master CLI: "

    def __init__(self, socket_path: str, timeout: float = 2.0,
                 connect_grace: float = 5.0) -> None:
        super().__init__(socket_path, timeout, connect_grace)

    def show_proc(self) -> ShowProc:
        """``show proc``, read-only: a connection the master resets (it does, briefly, around
        starts and reloads) is retried for ``connect_grace`` seconds."""
        for attempt in backoff(_MasterReset, timeout=self.connect_grace, initial=0.05,
                               maximum=0.05, jitter=0):
            with attempt:
                try:
                    return parse_show_proc(self.command("show proc"))
                except HAProxyError as exc:
                    if isinstance(exc.__cause__, ConnectionResetError | BrokenPipeError):
                        raise _MasterReset(str(exc)) from exc.__cause__
                    raise
        raise AssertionError("unreachable: backoff() re-raises its last error")

    def reload_count(self) -> int:
        """Reloads this master performed (the master row's ``reloads`` column).

        Counts every reload attempt, successful or failed, since this master process
        started; it restarts from 0 when the master itself is restarted.
        """
        return self.show_proc().master.reloads

    def worker_pids(self) -> list[int]:
        """Pids of the current workers (not the old ones still finishing connections)."""
        return [p.pid for p in self.show_proc().workers]

    def reload(self, timeout: float = 15.0) -> ShowProc:
        """Send ``reload``; poll ``show proc`` until the reload counter moved and a new
        worker is listed (returned). HAProxyError if the master reports a failed reload."""
        before = self.show_proc()
        old = {p.pid for p in before.workers}
        with self._connect("reload") as sock:
            try:
                sock.sendall(b"reload\n")
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # 2.6 answers nothing; the connection just closes
                    pass
            except OSError as exc:
                log.debug("master CLI reload: %s (expected while it re-executes)", exc)
        last: list[ShowProc | HAProxyError] = [before]

        def reloaded() -> ShowProc | None:
            try:
                now = self.show_proc()
            except HAProxyError as exc:
                last[0] = exc
                return None
            last[0] = now
            if now.master.reloads <= before.master.reloads:
                return None
            if now.master.failed > 0:
                raise HAProxyError(f"reload failed: master reports {now.master.failed}"
                                   " failed reload(s); the old worker keeps serving")
            return now if any(p.pid not in old for p in now.workers) else None

        done = poll(reloaded, timeout=timeout)
        if done is None:
            raise HAProxyError(f"reload: no new worker within {timeout:g}s (last: {last[0]!r})")
        return done
