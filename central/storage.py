"""Content-addressed object store: a blob's path is derived from its sha256, never from a sender.

``objects/ab/cd/<sha256>``; writes go temp → fsync → rename → fsync dir, so a crash leaves either
no object or a whole one. Storing the same bytes twice is a no-op, unless the copy already there no
longer hashes to its name: then the new good copy replaces it (atomically, by rename), because the
sender's copy may be the last good one anywhere.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

from central.errors import StorageError
from central.fsutil import fsync_dir

_HEX = frozenset("0123456789abcdef")


def _check_digest(sha256: str) -> str:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise StorageError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return sha256


class Put(enum.Enum):
    """What ``put_file`` found under the object's name before it was done."""

    STORED = "stored"       # nothing: the object is new to the store (or had gone missing)
    KEPT = "kept"           # a good copy: the new one was dropped
    REPLACED = "replaced"   # bytes not hashing to the name: the good copy replaced them


@dataclass(frozen=True, slots=True)
class ObjectStore:
    root: Path

    def path_for(self, sha256: str) -> Path:
        digest = _check_digest(sha256)
        return self.root / digest[:2] / digest[2:4] / digest

    def contains(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def put_file(self, source: Path, sha256: str, *, hashed: bool = False, sync: bool = True) -> Put:
        """Move ``source`` (already fsynced, on the same filesystem) into the store under its hash.

        The hash is re-checked here — the store must never hold bytes under another object's name —
        unless ``hashed``: the caller computed it over exactly the bytes it wrote into ``source``, a
        private file nobody else writes (the assembler does; re-reading it cost a third pass).
        An existing copy is re-hashed, and replaced if it is damaged. ``sync=False``: the caller
        makes the directories durable later, with one barrier for many objects (``syncfs``).
        """
        target = self.path_for(sha256)
        if not hashed:
            actual = file_sha256(source)
            if actual != sha256:
                raise StorageError(f"object hash mismatch: expected {sha256}, file hashes to {actual}")
        outcome = Put.STORED
        if target.is_file():
            if file_sha256(target) == sha256:
                source.unlink()
                return Put.KEPT
            outcome = Put.REPLACED
        for directory in (target.parent.parent, target.parent):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, exist_ok=True)
                if sync:
                    fsync_dir(directory.parent)
        source.chmod(0o400)   # stored objects are immutable
        source.replace(target)   # over a damaged copy too: readers see the old or the new file
        if sync:
            fsync_dir(target.parent)
        return outcome


def file_sha256(path: Path, *, block: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
