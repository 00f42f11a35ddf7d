"""Fewer bytes on the wire, originals bit-exact: JPEG scans travel as lossless JPEG XL transcodes.

``cjxl --lossless_jpeg=1`` keeps the JPEG's own DCT coefficients and the data to rebuild its file, so
``djxl`` gives the identical bytes back (measured here on a 200 dpi A4 page: 260,013 → 168,934 B).
A transcode is used only after ``djxl`` has restored exactly the bytes whose sha256 the outbox
recorded; anything else (no tools, a JPEG the encoder cannot carry, a mismatch) sends the file as it
is. Central restores the JPEG and checks the sha256 in the signed metadata before receipting.

Debian's ``libjxl-tools`` provides both tools; no Python binding is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ENCODING = "jpeg-xl"          # PackageMetadata.extra["original_encoding"] when the original travels as JXL
TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Transcoded:
    path: Path                # the verified .jxl (caller deletes it)
    size: int
    sha256: str
    seconds: float            # wall time of encoding + the verifying decode


@dataclass(frozen=True, slots=True)
class JxlTranscoder:
    cjxl: str
    djxl: str

    @classmethod
    def find(cls) -> JxlTranscoder | None:
        cjxl, djxl = shutil.which("cjxl"), shutil.which("djxl")
        return cls(cjxl, djxl) if cjxl and djxl else None

    def transcode(self, jpeg: Path, expected_sha256: str, work_dir: Path) -> Transcoded | None:
        """A JXL of ``jpeg`` that restores to exactly ``expected_sha256``, or None."""
        started = time.monotonic()
        fd, name = tempfile.mkstemp(suffix=".jxl", dir=work_dir)
        os.close(fd)
        jxl = Path(name)
        back = jxl.with_suffix(".back.jpg")
        try:
            # argv: a tool found on PATH, fixed flags, our own files (never a sender's name).
            encoded = subprocess.run([self.cjxl, "--lossless_jpeg=1", "--quiet", str(jpeg), str(jxl)],  # noqa: S603
                                     capture_output=True, timeout=TIMEOUT_S, check=False)
            if encoded.returncode != 0 or jxl.stat().st_size == 0:
                jxl.unlink()
                return None
            decoded = subprocess.run([self.djxl, "--quiet", str(jxl), str(back)], capture_output=True,  # noqa: S603
                                     timeout=TIMEOUT_S, check=False)
            if decoded.returncode != 0 or _sha256(back) != expected_sha256:
                jxl.unlink()
                return None
            size = jxl.stat().st_size
            if size >= jpeg.stat().st_size:
                jxl.unlink()   # no gain: send the JPEG itself
                return None
            return Transcoded(jxl, size, _sha256(jxl), time.monotonic() - started)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(FileNotFoundError):
                jxl.unlink()
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                back.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
