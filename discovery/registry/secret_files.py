"""Reading the registry's password file and PEM files (``password_file=``, ``ca=``, ``cert=``,
``key=``): only a regular file, and at most :data:`MAX_BYTES` of it (a password file) or
:data:`MAX_PEM_BYTES` (a PEM file: a system CA bundle is ~220 KiB).

A device (``/dev/zero``, ``/dev/urandom``) would be read without end, and a directory or a
socket cannot be: each is one :class:`ConfigError` naming the parameter and the path, found by
``os.stat`` before the file is opened (and again by ``fstat`` of the file opened with
``O_NONBLOCK``, should it have been swapped meanwhile). A pipe (a shell's ``<(vault read …)``,
``/dev/stdin``) is read to its end within :data:`PIPE_WAIT` seconds and the same size: a FIFO
no one writes to held the start-up for good.
"""

from __future__ import annotations

import os
import select
import stat
import time

from discovery.errors import ConfigError

#: a password file is far smaller; a bigger one is a mistake
MAX_BYTES = 64 * 1024
#: a PEM file: certificates and keys, or a CA bundle (the system's ~220 KiB; a bigger one with
#: a company's CAs added): generous, only the bound of a read that would not end
MAX_PEM_BYTES = 16 * 1024 * 1024
WHERE_SET = {  # how each file/secret can be given, for error messages
    "ca": "ca= in the URL, --registry-ca or DISCOVERY_REGISTRY_CA",
    "cert": "cert= in the URL, --registry-cert or DISCOVERY_REGISTRY_CERT",
    "key": "key= in the URL, --registry-key or DISCOVERY_REGISTRY_KEY",
    "password_file": "password_file= in the URL, --registry-password-file or "
                     "DISCOVERY_REGISTRY_PASSWORD_FILE",
    "password": "user:password@ in the URL, DISCOVERY_REGISTRY_PASSWORD or "
                "--registry-password-file",
}
_PEM_MARK = {"ca": b"CERTIFICATE", "cert": b"CERTIFICATE", "key": b"PRIVATE KEY"}
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
#: seconds a pipe is read for, to its end (its writer, a command, has that long)
PIPE_WAIT = 10.0


def _refused(path: str, param: str, why: str) -> ConfigError:
    return ConfigError(f"registry {param}= file {path!r}: cannot read it: {why} "
                       f"(set by {WHERE_SET[param]})")


def _check(mode: int, size: int, path: str, param: str) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise _refused(path, param, f"{kind}, not a regular file or a pipe")
    if size > (most := _most(param)):
        raise _refused(path, param, f"over {_size(most)}, too big for a "
                                    f"{'PEM' if param in _PEM_MARK else 'password'} file")


def _size(n: int) -> str:
    return f"{n // 1024 // 1024} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def _read_pipe(fd: int, path: str, param: str) -> bytes:
    """A pipe's bytes to its end, within PIPE_WAIT s and its size (else a ConfigError)."""
    data, deadline = bytearray(), time.monotonic() + PIPE_WAIT
    while True:
        try:
            chunk = os.read(fd, 65536)  # (b"": its end, or a FIFO no one has opened to write)
        except BlockingIOError:  # a writer, silent so far
            if (left := deadline - time.monotonic()) <= 0:
                raise _refused(path, param, f"a pipe that did not end within {PIPE_WAIT:g} s"
                               ) from None
            select.select([fd], [], [], left)
            continue
        if not chunk:
            return bytes(data)
        data += chunk
        _check(stat.S_IFIFO, len(data), path, param)


def _most(param: str) -> int:
    return MAX_PEM_BYTES if param in _PEM_MARK else MAX_BYTES


def read_file(path: str, param: str) -> bytes:
    """The bytes of the regular file or pipe ``path`` given as ``param``; a ConfigError naming
    both when it is missing, unreadable, neither, or over its size (:func:`_most`)."""
    try:
        st = os.stat(path)
        _check(st.st_mode, st.st_size, path, param)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check(st.st_mode, st.st_size, path, param)
            data = (_read_pipe(f.fileno(), path, param) if stat.S_ISFIFO(st.st_mode)
                    else f.read(_most(param) + 1))  # (it may have grown since)
    except OSError as exc:
        raise _refused(path, param, str(exc.strerror or exc)) from None
    _check(stat.S_IFREG, len(data), path, param)
    return data


def pem(path: str | None, param: str) -> bytes | None:
    """The PEM file ``path`` given as ``param`` (``ca``, ``cert``, ``key``), or None."""
    if path is None:
        return None
    data = read_file(path, param)
    if b"-----BEGIN " not in data or _PEM_MARK[param] not in data:
        kind = "private key" if param == "key" else "certificate"
        raise ConfigError(f"registry {param}= file {path!r}: not a PEM {kind} "
                          f"(set by {WHERE_SET[param]})")
    return data
