"""The registry's password and PEM files are read only when regular or a pipe, and bounded: a
device named by password_file=, ca=, cert= or key= is one ConfigError, and a pipe is read to its
end within PIPE_WAIT; never a start-up that waits for a writer for good or reads without end
(discovery.registry.secret_files)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from discovery.errors import ConfigError
from discovery.registry.security import load_secrets
from discovery.registry.url import RegistryURL

PEM_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
#: how long a load_secrets that should answer at once may take before the test calls it hung
HUNG = 10.0


def url_naming(param: str, path: Path | str, tmp_path: Path) -> RegistryURL:
    """A URL naming ``path`` as ``param``'s file (and good files for the rest it needs)."""
    (tmp_path / "ca.pem").write_bytes(PEM_CERT)
    (tmp_path / "k.pem").write_bytes(PEM_KEY)
    query = {"password_file": f"password_file={path}", "ca": f"ca={path}",
             "cert": f"cert={path}&key={tmp_path}/k.pem",
             "key": f"cert={tmp_path}/ca.pem&key={path}"}[param]
    user = "u@" if param == "password_file" else ""
    return RegistryURL.parse(f"etcd://{user}h/p?{query}")


def load_within(url: RegistryURL, fifo: Path | None = None) -> BaseException | None:
    """What load_secrets(url) raised (None: nothing), failing the test if it hangs; a reader
    stuck opening ``fifo`` is set free (a writer opens and closes it) so no thread is left."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_secrets(url)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HUNG)
    hung = thread.is_alive()
    if hung and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader waits: it sees EOF
        thread.join()
    assert not hung, f"load_secrets hung on {url}"
    return outcome[0]


@pytest.mark.parametrize("param", ["password_file", "ca", "cert", "key"])
def test_a_fifo_no_one_writes_to_is_an_error_at_once(tmp_path: Path, param: str) -> None:
    """It held the start-up until something wrote to it (for good, at a wrong path)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    error = load_within(url_naming(param, fifo, tmp_path), fifo)
    assert isinstance(error, ConfigError) and f"{param}=" in str(error) and str(fifo) in str(error)


def test_a_pipe_is_read_to_its_end(tmp_path: Path) -> None:
    """A shell's ``--registry-password-file <(vault read ...)``: /dev/fd/N, a pipe."""
    read, write = os.pipe()
    os.write(write, b"s3cret\n")
    os.close(write)
    try:
        secrets = load_secrets(url_naming("password_file", f"/dev/fd/{read}", tmp_path))
    finally:
        os.close(read)
    assert secrets.password == "s3cret"


def test_a_pipe_that_does_not_end_is_an_error_in_its_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("discovery.registry.secret_files.PIPE_WAIT", 0.3)
    read, write = os.pipe()
    os.write(write, b"s3cret")  # and its writer never closes it
    try:
        error = load_within(url_naming("password_file", f"/dev/fd/{read}", tmp_path))
    finally:
        os.close(write)
        os.close(read)
    assert isinstance(error, ConfigError) and "did not end within 0.3 s" in str(error)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
@pytest.mark.parametrize("param", ["password_file", "ca", "key"])
def test_a_device_is_refused_unread(tmp_path: Path, param: str, device: str) -> None:
    error = load_within(url_naming(param, device, tmp_path))
    assert isinstance(error, ConfigError)
    assert f"{param}= file '{device}'" in str(error)
    assert "character device, not a regular file or a pipe" in str(error)


@pytest.mark.parametrize(("param", "cap"), [("password_file", "64 KiB"), ("ca", "16 MiB")])
def test_a_file_over_the_cap_is_refused(tmp_path: Path, param: str, cap: str) -> None:
    big = tmp_path / "big"
    big.write_bytes(PEM_CERT + b"x" * (64 * 1024 if param == "password_file" else 16 << 20))
    with pytest.raises(ConfigError, match=rf"{param}= file '{big}': .*over {cap}"):
        load_secrets(url_naming(param, big, tmp_path))


def test_a_ca_bundle_as_big_as_the_systems_is_read(tmp_path: Path) -> None:
    """/etc/ssl/certs/ca-certificates.crt is ~220 KiB (a company's CAs added: more): the
    password file's 64 KiB refused it, and every host naming it at the upgrade."""
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_bytes(PEM_CERT * (300 * 1024 // len(PEM_CERT) + 1))
    assert bundle.stat().st_size > 300 * 1024
    secrets = load_secrets(url_naming("ca", bundle, tmp_path))
    assert secrets.ca == bundle.read_bytes()


def test_a_file_at_the_cap_is_read_and_a_symlink_followed(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"p" * (64 * 1024 - 1) + b"\n")
    (tmp_path / "link").symlink_to(tmp_path / "pw")  # (a Kubernetes secret is one)
    secrets = load_secrets(url_naming("password_file", tmp_path / "link", tmp_path))
    assert secrets.password == "p" * (64 * 1024 - 1)
