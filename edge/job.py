"""The per-document job context: every file the box keeps for one document, named by its tid.

Names on disk never come from the clerk (the clerk's name lives in the outbox row and inside the
encrypted package); one set of paths per row, so two rows holding identical bytes never share one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.bag import MEDIA_EXTENSIONS


@dataclass(frozen=True, slots=True)
class Layout:
    """The edge's folders (all in its private home, except the scan and refused folders)."""

    processed: Path
    envelopes: Path
    work: Path
    watch: Path
    refused: Path

    def job(self, tid: str, media_type: str) -> Job:
        return Job(tid=tid, held=self.processed / f"{tid}.{MEDIA_EXTENSIONS.get(media_type, 'bin')}",
                   envelope=self.envelopes / f"{tid}.env", package=self.work / f"{tid}.tar")

    def private_dirs(self) -> tuple[Path, ...]:
        return (self.processed, self.envelopes, self.work)


@dataclass(frozen=True, slots=True)
class Job:
    tid: str
    held: Path       # the original, from the moment it is taken until custody releases it
    envelope: Path   # the sealed, signed envelope, from packaging until the receipt
    package: Path    # the plaintext package tar, only while it is being sealed
