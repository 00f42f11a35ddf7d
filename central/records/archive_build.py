"""Build and sign one archival copy, in a child process: ``python -m central.records.archive_build``.

The archival worker (``central.records.archive_jobs``) starts one child per job, hands it a JSON request on
stdin and reads a JSON answer on stdout. A child because the work is CPU-heavy (it would compete
with ingest for the GIL) and decodes images a device sent (an address-space limit bounds what one
hostile page can take; a kill on timeout ends it cleanly, which a thread cannot).

Request: {original, media_type, package, out_dir, title, created, key, cert, address_space_mib}.
Answer: {"ok": true, "path", "sha256", "size", "pages", "seconds"} or {"ok": false, "error", "kind"}.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import os
import resource
import signal
import sys
import tarfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from protocol.bag import HOCR, METADATA, PackageMetadata
from protocol.errors import BagError

SIGN_REASON = "Bản số hóa lưu trữ (Nghị định 30/2020/NĐ-CP, Phụ lục I)"
MAX_HOCR_BYTES = 256 * 1024 * 1024
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class BuildRequest:
    original: Path
    media_type: str
    package: Path
    out_dir: Path
    title: str
    created: str           # ISO 8601; the copy's XMP dates (the arrival's received time)
    key: Path
    cert: Path
    address_space_mib: int = 2048
    parent_pid: int = 0    # the worker's; the child ends itself if that process is gone

    def to_json(self) -> bytes:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
                          ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BuildRequest:
        obj: dict[str, Any] = json.loads(data)
        for name in ("original", "package", "out_dir", "key", "cert"):
            obj[name] = Path(obj[name])
        return cls(**obj)


class BuildInputError(Exception):
    """The stored package or original cannot make an archival copy (deterministic: retrying the
    same bytes gives the same answer, though a newer sohoa may succeed)."""


def read_package(package: Path) -> tuple[PackageMetadata, str]:
    """The metadata (page geometry) and hOCR of a stored package (an uncompressed BagIt tar)."""
    wanted: dict[str, bytes] = {}
    try:
        with tarfile.open(package, mode="r:") as tar:
            for member in tar:
                if member.name in (METADATA, HOCR) and member.isreg():
                    if member.size > MAX_HOCR_BYTES:
                        raise BuildInputError(f"{member.name} is {member.size} bytes, over {MAX_HOCR_BYTES}")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    wanted[member.name] = handle.read()
    except tarfile.TarError as exc:
        raise BuildInputError(f"the stored package is not a readable tar: {exc}") from exc
    if METADATA not in wanted:
        raise BuildInputError("the stored package has no metadata.json")
    try:
        metadata = PackageMetadata.from_json(wanted[METADATA])
    except BagError as exc:
        raise BuildInputError(f"the stored package's metadata is invalid: {exc}") from exc
    return metadata, wanted.get(HOCR, b"").decode("utf-8", errors="replace")


def build(request: BuildRequest) -> dict[str, Any]:
    # Imported here: the parent imports this module for BuildRequest without pikepdf/pyHanko.
    from central.records.archival import build_pdfa  # noqa: PLC0415
    from central.records.archive_sign import sign_pdf  # noqa: PLC0415

    started = time.monotonic()
    metadata, hocr = read_package(request.package)
    unsigned = request.out_dir / f"{os.getpid()}-unsigned.pdf"
    signed = request.out_dir / f"{os.getpid()}-signed.pdf"
    try:
        build_pdfa(request.original, request.media_type, hocr, unsigned, title=request.title,
                   page_info=metadata.ocr.page_info, created=dt.datetime.fromisoformat(request.created))
        sign_pdf(unsigned, signed, key=request.key, cert=request.cert, reason=SIGN_REASON)
    finally:
        unsigned.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with signed.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        os.fsync(handle.fileno())
    sha = digest.hexdigest()
    final = request.out_dir / f"{sha}.pdf"
    signed.replace(final)
    import pikepdf  # noqa: PLC0415

    with pikepdf.open(final) as pdf:
        pages = len(pdf.pages)
    return {"ok": True, "path": str(final), "sha256": sha, "size": final.stat().st_size, "pages": pages,
            "seconds": round(time.monotonic() - started, 3)}


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this child when central dies (kill -9 included), so no orphan build finishes into
    the build directory after a new central has cleaned it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent and os.getppid() != parent:   # the parent died before prctl took effect
        sys.exit(4)


def main() -> int:
    request = BuildRequest.from_json(sys.stdin.buffer.read())
    _die_with_parent(request.parent_pid)
    limit = request.address_space_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        answer = build(request)
    except BuildInputError as exc:
        answer = {"ok": False, "kind": "input", "error": str(exc)[:2000]}
    except MemoryError:
        answer = {"ok": False, "kind": "memory",
                  "error": f"out of memory under the {request.address_space_mib} MiB address-space limit"}
    except Exception as exc:   # every failure is reported to the worker, with its class
        answer = {"ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    sys.stdout.write(json.dumps(answer, ensure_ascii=False))
    sys.stdout.flush()
    return 0 if answer["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
