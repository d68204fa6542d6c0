"""Installing a staged file (``discovery.files``): renamed over the old one, or written in
place where a rename cannot work (a bind-mounted single file), never half-written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from discovery.files import install, stage


def test_install_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("one\n")
    os.chmod(dest, 0o640)
    staged = stage("one\n", dest)
    assert staged.parent == dest.parent
    assert install(staged, dest) is False and not staged.exists()
    inode = dest.stat().st_ino
    assert install(stage("two\n", dest), dest) is True
    assert dest.read_text() == "two\n" and dest.stat().st_ino != inode  # renamed over
    assert dest.stat().st_mode & 0o777 == 0o640
    assert install(stage("new\n", tmp_path / "fresh.cfg"),
                          tmp_path / "fresh.cfg") is True

    def busy(src: object, dst: object) -> None:  # as for a bind-mounted single file
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)
    inode = dest.stat().st_ino
    staged = stage("three\n", dest)
    assert install(staged, dest) is True
    assert dest.read_text() == "three\n" and dest.stat().st_ino == inode  # written in place
    assert not staged.exists()

    def denied(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(OSError):
        install(stage("four\n", dest), dest)
    assert dest.read_text() == "three\n"


def test_a_disk_full_while_writing_in_place_leaves_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written in place (a rename refused), a larger file that the disk cannot take: the old
    bytes stay, whole; truncating first left a partial config for a restart to load."""
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("global\n  maxconn 100\n")

    def busy(src: object, dst: object) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    real_pwrite, writes = os.pwrite, []

    def full(fd: int, data: bytes, offset: int) -> int:  # room for the old size only
        writes.append(offset)
        if offset + len(data) > 22:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "replace", busy)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        install(stage("global\n  maxconn 100\nfrontend f\n  bind :80\n", dest), dest)
    assert dest.read_text() == "global\n  maxconn 100\n" and writes


def test_a_failed_stage_leaves_nothing_and_new_files_follow_the_umask(tmp_path: Path) -> None:
    from discovery.files import write_atomic

    with pytest.raises(UnicodeEncodeError):
        write_atomic(tmp_path / "out.json", "x\udcff")  # cannot be written as UTF-8
    assert list(tmp_path.iterdir()) == []
    from discovery import files

    write_atomic(tmp_path / "private", "{}")
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600  # haproxy.cfg, state files
    write_atomic(tmp_path / "new.json", "{}", shared=True)  # --json-out: the umask's mode
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~files._umask()
    # the umask as the process has it, read without changing it: 027 gives 0640
    code = ("import sys; from pathlib import Path; from discovery.files import write_atomic; "
            "write_atomic(Path(sys.argv[1]), '{}', shared=True)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other.json")], check=True,
                   cwd=Path(__file__).resolve().parents[2], preexec_fn=lambda: os.umask(0o027),
                   timeout=30)
    assert (tmp_path / "other.json").stat().st_mode & 0o777 == 0o640
