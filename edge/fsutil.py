"""Crash-safe file operations: a power cut leaves either the old file or the complete new one.

Pattern: write a temp file in the same directory, fsync it, rename over the target, fsync the
directory (the rename is only durable once the directory entry is).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block exits without an exception."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as handle:  # readable too: TIFF writers seek back
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_status_file(path: Path, data: bytes, mode: int) -> None:
    """Replace a status file atomically; on a full disk, overwrite it in place instead.

    A full disk is exactly when the clerk and the operator must see the alarm, and an atomic replace
    needs a new block. Rewriting the existing file reuses its blocks (statuses are a few KiB); a
    power cut in that instant could tear it, and the next atomic write repairs it.
    """
    try:
        atomic_write_bytes(path, data, mode)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            written = os.pwrite(fd, data, 0)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write of {path}") from exc
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)


class LockHeld(OSError):
    """Another process holds the lock; ``holder`` is the pid it wrote, if it could be read."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by process {holder or '?'}")
        self.path = path
        self.holder = holder


@contextlib.contextmanager
def hold_lock(path: Path, *, mode: int = 0o600) -> Iterator[None]:
    """Hold ``path`` (flock, exclusive, not waiting) for the block; ``LockHeld`` if it is held. The
    kernel releases it however the process ends, so a crash leaves no stale lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, os.pread(fd, 32, 0).decode(errors="replace").strip()) from None
        with contextlib.suppress(OSError):   # the pid is for the message; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_is_held(path: Path) -> bool | None:
    """Whether some process holds ``path`` (``hold_lock``); None if that cannot be told (no such
    file, or not ours to open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        return False
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def move_durably(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (never following a symlink), durable in both directories."""
    try:
        src.rename(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across_devices(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def _copy_across_devices(src: Path, dst: Path) -> None:
    info = src.lstat()
    tmp = dst.with_name(f".{dst.name}.move.tmp")
    tmp.unlink(missing_ok=True)
    # Never open a symlink or a FIFO: recreate the link / the FIFO itself instead of its content.
    if stat.S_ISLNK(info.st_mode):
        tmp.symlink_to(src.readlink())
        tmp.replace(dst)
    elif stat.S_ISFIFO(info.st_mode):
        os.mkfifo(tmp, 0o600)
        tmp.replace(dst)
    elif stat.S_ISREG(info.st_mode):
        with src.open("rb") as reader, atomic_writer(dst, 0o600) as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
        os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns))
    else:
        raise OSError(errno.EXDEV, f"cannot move a device or socket across file systems: {src}")
    src.unlink()


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
