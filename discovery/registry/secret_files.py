"""Reading the registry's password file and PEM files (``password_file=``, ``ca=``, ``cert=``,
``key=``): only a regular file, and at most :data:`MAX_BYTES` of it (a password file) or
:data:`MAX_PEM_BYTES` (a PEM file: a system CA bundle is ~220 KiB).

A FIFO named by mistake would hold the start-up until something wrote to it, and a device
(``/dev/zero``, ``/dev/urandom``) would be read without end: either is one :class:`ConfigError`
naming the parameter and the path, found by ``os.stat`` before the file is opened (and again by
``fstat`` of the file opened with ``O_NONBLOCK``, should it have been swapped meanwhile).
"""

from __future__ import annotations

import os
import stat

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
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _refused(path: str, param: str, why: str) -> ConfigError:
    return ConfigError(f"registry {param}= file {path!r}: cannot read it: {why} "
                       f"(set by {WHERE_SET[param]})")


def _check(mode: int, size: int, path: str, param: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise _refused(path, param, f"{kind}, not a regular file")
    if size > (most := _most(param)):
        raise _refused(path, param, f"over {most // 1024} KiB, too big for a "
                                    f"{'PEM' if param in _PEM_MARK else 'password'} file")


def _most(param: str) -> int:
    return MAX_PEM_BYTES if param in _PEM_MARK else MAX_BYTES


def read_file(path: str, param: str) -> bytes:
    """The bytes of the regular file ``path`` given as ``param``; a ConfigError naming both
    when it is missing, unreadable, not a regular file or over its size (:func:`_most`)."""
    try:
        st = os.stat(path)
        _check(st.st_mode, st.st_size, path, param)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check(st.st_mode, st.st_size, path, param)
            data = f.read(_most(param) + 1)  # (it may have grown since)
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
