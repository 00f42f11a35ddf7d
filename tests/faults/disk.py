"""A small real filesystem that runs out of space on demand, for disk-full tests of outbox and storage.

A size-capped tmpfs gives a genuine ENOSPC from the kernel (a mocked ``write`` would not exercise the
code paths that see a short write, a failed fsync or SQLite's "database or disk is full").
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER_PREFIX = ".sohoa-filler-"
# fill() refuses to write more than this, so a path that is not the small tmpfs cannot eat a real disk.
MAX_FILL_BYTES = 1 << 30


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still use on the filesystem holding ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def tmpfs(size_mb: int) -> Iterator[Path]:
    """Mount a ``size_mb`` MiB tmpfs on a fresh directory (mode 0700); unmount it on exit.

    Skips the calling test when mounting is not permitted (not root, no CAP_SYS_ADMIN, no mount(8)).
    """
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    mount = shutil.which("mount")
    umount = shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not available")
    directory = Path(tempfile.mkdtemp(prefix="sohoa-tmpfs-"))
    try:
        result = subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        try:
            yield directory
        finally:
            # A lazy unmount still detaches the tree if a test left a file open (an SQLite handle).
            unmounted = subprocess.run([umount, str(directory)], capture_output=True, check=False)
            if unmounted.returncode != 0:
                subprocess.run([umount, "-l", str(directory)], capture_output=True, check=True)
    finally:
        with contextlib.suppress(OSError):
            directory.rmdir()


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Occupy the filesystem holding ``path`` until at most ``leave_bytes`` remain free.

    Returns the filler file (inside ``path``); hand it to ``free`` to give the space back.
    """
    if leave_bytes < 0:
        raise ValueError(f"leave_bytes must not be negative, got {leave_bytes}")
    to_take = free_bytes(path) - leave_bytes
    if to_take > MAX_FILL_BYTES:
        raise ValueError(
            f"refusing to fill {to_take} bytes under {path}: use fill() on a small tmpfs from tmpfs()"
        )
    fd, name = tempfile.mkstemp(prefix=FILLER_PREFIX, dir=path)
    try:
        if to_take > 0:
            block = os.statvfs(path).f_frsize
            # Round up to whole blocks: space is handed out per block, so what remains is <= leave_bytes.
            to_take = -(-to_take // block) * block
            try:
                os.posix_fallocate(fd, 0, to_take)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOSPC, errno.EINVAL):
                    raise
                _write_until(fd, to_take)
    finally:
        os.close(fd)
    return Path(name)


def _write_until(fd: int, nbytes: int) -> None:
    """Fallback for filesystems without fallocate: write zeros until ``nbytes`` or ENOSPC."""
    zeros = bytes(1 << 20)
    os.lseek(fd, 0, os.SEEK_END)
    written = os.fstat(fd).st_size
    while written < nbytes:
        try:
            written += os.write(fd, zeros[: min(len(zeros), nbytes - written)])
        except OSError as error:
            if error.errno == errno.ENOSPC:
                return
            raise
    os.fsync(fd)


def free(target: Path) -> None:
    """Give back the space taken by ``fill``: pass the filler file, or a directory to drop all of them."""
    if target.is_dir():
        for filler in target.glob(f"{FILLER_PREFIX}*"):
            filler.unlink(missing_ok=True)
    else:
        if not target.name.startswith(FILLER_PREFIX):
            raise ValueError(f"{target} is not a filler made by fill()")
        target.unlink(missing_ok=True)
