"""Turn a fully received ciphertext into verified, decrypted, unpacked files (DESIGN §1 "assemble").

Order matters and is the point of this module: whole-ciphertext size and hash, then the device
signature (both via ``verify_ciphertext``), and only then decrypt; the decrypted package is read as
a tar stream whose member names and order are a closed set (``protocol.bag``), each payload file
hashed against the manifest. Nothing here names a file after anything the sender chose.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nacl.public
import nacl.signing

from protocol.bag import (
    BAGIT_TXT,
    HOCR,
    METADATA,
    TAG_FILES,
    TEXT,
    PackageMetadata,
    check_tid_matches,
    original_member,
    parse_manifest,
    payload_members,
)
from protocol.envelope import EnvelopeOpener, SignedHeader, verify_ciphertext
from protocol.errors import BagError

BLOCK = 1024 * 1024
MAX_TAG_FILE = 1024 * 1024          # bagit.txt, bag-info.txt, manifest: tiny by construction
MAX_METADATA = 1024 * 1024
MAX_TEXT = 256 * 1024 * 1024        # OCR text of a very long register still fits comfortably
# A ciphertext up to this size is read from the journal once: the hash pass keeps the chunks and the
# decrypt pass reuses them (the same bytes that were verified are the ones decrypted). Larger ones
# are read twice rather than held (16 assemblers × 4 MiB at most).
KEEP_CIPHERTEXT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Assembled:
    """A verified package on local disk, ready to be stored and catalogued."""

    metadata: PackageMetadata
    metadata_json: str
    text: str
    original: Path            # temp file, fsynced; the caller moves it into the object store
    original_sha256: str
    package: Path             # the decrypted BagIt tar, fsynced
    package_sha256: str
    ciphertext_sha256: str


def file_digest(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(BLOCK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


def _fsync_close(handle: IO[bytes], *, sync: bool = True) -> None:
    handle.flush()
    if sync:
        os.fsync(handle.fileno())
    handle.close()


def _private_file(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


Ciphertext = Callable[[], Iterable[bytes]]
"""Reads the whole ciphertext from the start, each time it is called (it is read twice: hash, then
decrypt — nothing is decrypted before the hash and the device signature are checked)."""


def file_ciphertext(path: Path) -> Ciphertext:
    def read() -> Iterator[bytes]:
        with path.open("rb") as handle:
            while chunk := handle.read(BLOCK):
                yield chunk
    return read


def decrypt_to_file(ciphertext: Ciphertext | Path, signed: SignedHeader, device_key: nacl.signing.VerifyKey,
                    central_key: nacl.public.PrivateKey, *, max_plaintext: int, out: Path,
                    sync: bool = True) -> tuple[str, str]:
    """Verify then decrypt the ciphertext into ``out``; return (ciphertext sha256, package sha256)."""
    read = file_ciphertext(ciphertext) if isinstance(ciphertext, Path) else ciphertext
    digest = hashlib.sha256()
    size = 0
    kept: list[bytes] | None = [] if signed.header.ciphertext_size <= KEEP_CIPHERTEXT else None
    for chunk in read():
        digest.update(chunk)
        size += len(chunk)
        if kept is not None:
            kept.append(chunk)
            if size > KEEP_CIPHERTEXT:
                kept = None   # longer than signed: verify_ciphertext refuses it below
    ciphertext_digest = digest.digest()
    verified = verify_ciphertext(signed, device_key, size=size, sha256=ciphertext_digest)
    package_digest = hashlib.sha256()
    sink = _private_file(out)
    try:
        def write(data: bytes) -> None:
            package_digest.update(data)
            sink.write(data)

        opener = EnvelopeOpener(verified, central_key, max_plaintext=max_plaintext, sink=write)
        for chunk in kept if kept is not None else read():
            opener.update(chunk)
        opener.finish()
    finally:
        _fsync_close(sink, sync=sync)
    return ciphertext_digest.hex(), package_digest.hexdigest()


def _read_capped(handle: IO[bytes], cap: int, name: str) -> bytes:
    data = handle.read(cap + 1)
    if len(data) > cap:
        raise BagError(f"{name} is larger than {cap} bytes")
    return data


def _copy_hashing(handle: IO[bytes], write: Callable[[bytes], object]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(BLOCK):
        digest.update(chunk)
        write(chunk)
    return digest.hexdigest()


def unpack(package: Path, *, device: str, tid: str, seq: int, original_out: Path,
           sync: bool = True) -> tuple[PackageMetadata, str, str, str]:
    """Stream-read the package tar; return (metadata, metadata json, text, original sha256)."""
    try:
        return _unpack(package, device=device, tid=tid, seq=seq, original_out=original_out, sync=sync)
    except tarfile.TarError as exc:
        raise BagError(f"package is not a valid tar: {exc}", device=device, tid=tid) from exc


def _unpack(package: Path, *, device: str, tid: str, seq: int, original_out: Path,
            sync: bool) -> tuple[PackageMetadata, str, str, str]:
    expected: list[str] = [*TAG_FILES, METADATA, TEXT, HOCR]   # original's name follows metadata
    hashes: dict[str, str] = {}
    manifest: dict[str, str] | None = None
    metadata: PackageMetadata | None = None
    metadata_json = ""
    text = ""
    jxl = False
    seen: list[str] = []
    with package.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            position = len(seen)
            if position >= len(expected):
                raise BagError(f"unexpected extra member {member.name[:80]!r}", device=device, tid=tid)
            if member.name != expected[position] or not member.isreg():
                raise BagError(f"member {position} is {member.name[:80]!r} (type {member.type!r}), "
                               f"expected regular file {expected[position]!r}", device=device, tid=tid)
            seen.append(member.name)
            handle = tar.extractfile(member)
            assert handle is not None   # regular files always have a body
            name = member.name
            if name in TAG_FILES:
                data = _read_capped(handle, MAX_TAG_FILE, name)
                if name == "bagit.txt" and data != BAGIT_TXT:
                    raise BagError("bagit.txt is not BagIt 1.0 UTF-8", device=device, tid=tid)
                if name == "manifest-sha256.txt":
                    manifest = parse_manifest(data)
                continue
            if name == METADATA:
                data = _read_capped(handle, MAX_METADATA, name)
                metadata = PackageMetadata.from_json(data)
                check_tid_matches(metadata, tid, device)
                if metadata.seq != seq:
                    raise BagError(f"metadata seq {metadata.seq} differs from the signed header's {seq}",
                                   device=device, tid=tid)
                expected.append(original_member(metadata.media_type))
                encoding = metadata.extra.get("original_encoding")
                if encoding not in (None, JXL_ENCODING) or (encoding and metadata.media_type != "image/jpeg"):
                    raise BagError(f"original_encoding {str(encoding)[:40]!r} is not known for "
                                   f"{metadata.media_type}", device=device, tid=tid)
                jxl = encoding == JXL_ENCODING
                metadata_json = data.decode("utf-8")
                hashes[name] = hashlib.sha256(data).hexdigest()
            elif name == TEXT:
                data = _read_capped(handle, MAX_TEXT, name)
                try:
                    text = unicodedata.normalize("NFC", data.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise BagError("text.txt is not UTF-8", device=device, tid=tid) from exc
                hashes[name] = hashlib.sha256(data).hexdigest()
            elif name == HOCR:
                hashes[name] = _copy_hashing(handle, lambda _chunk: None)
            else:
                # A JPEG that travelled as its lossless JPEG XL transcode (edge.transcode) is
                # restored below; the manifest names the bytes in the bag, the metadata the JPEG's.
                member_out = original_out.with_suffix(".jxl") if jxl else original_out
                with _private_file(member_out) as sink:
                    hashes[name] = _copy_hashing(handle, sink.write)
                    sink.flush()
                    if sync and not jxl:
                        os.fsync(sink.fileno())
    if seen != expected or metadata is None or manifest is None:
        raise BagError(f"package ends after {seen[-1] if seen else 'nothing'!r}; expected {expected}",
                       device=device, tid=tid)
    if set(manifest) != set(payload_members(metadata.media_type)):
        raise BagError("manifest does not list exactly the payload files", device=device, tid=tid)
    for name, digest in hashes.items():
        if manifest[name] != digest:
            raise BagError(f"{name} hashes to {digest[:16]}…, manifest says {manifest[name][:16]}…",
                           device=device, tid=tid)
    original_sha = hashes[expected[-1]]
    if jxl:
        original_sha = restore_jpeg(original_out.with_suffix(".jxl"), original_out,
                                    max_size=metadata.original_size, device=device, tid=tid, sync=sync)
    if original_sha != metadata.original_sha256 or original_out.stat().st_size != metadata.original_size:
        raise BagError("original does not match the size and sha256 in metadata.json", device=device, tid=tid)
    return metadata, metadata_json, text, original_sha


JXL_ENCODING = "jpeg-xl"     # edge.transcode.ENCODING (the two sides meet only in the package)
DJXL_TIMEOUT_S = 300.0
DJXL_MEMORY = 2 * 1024 * 1024 * 1024


def restore_jpeg(jxl: Path, out: Path, *, max_size: int, device: str, tid: str, sync: bool) -> str:
    """``djxl`` the transcode back to the JPEG; return its sha256 (the caller checks it against the
    signed metadata). The decoder is bounded: address space, output size (the declared JPEG's), time."""
    djxl = shutil.which("djxl")
    try:
        if djxl is None:
            # Our trouble, not the sender's: the job waits (retried) until libjxl-tools is installed.
            raise OSError("djxl is not installed: cannot restore a JPEG XL original "
                          "(apt install libjxl-tools)")

        # prlimit (util-linux), not preexec_fn: the assemblers are threads, and a Python hook between
        # fork and exec of a threaded process can deadlock.
        prlimit = shutil.which("prlimit")
        limits = [prlimit, f"--as={DJXL_MEMORY}", f"--fsize={max_size + 1}", "--"] if prlimit else []
        restored = out.with_suffix(".restored.jpg")   # djxl picks the output format by its extension
        try:
            done = subprocess.run([*limits, djxl, "--quiet", str(jxl), str(restored)],  # noqa: S603 - our files
                                  capture_output=True, timeout=DJXL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            restored.unlink(missing_ok=True)
            raise BagError("the JPEG XL original took too long to restore", device=device, tid=tid) from exc
        if done.returncode != 0 or not restored.is_file() or restored.stat().st_size > max_size:
            restored.unlink(missing_ok=True)
            why = done.stderr.decode("utf-8", "replace").strip()[-200:] or f"exit status {done.returncode}"
            raise BagError(f"the JPEG XL original does not restore to a JPEG ({why})", device=device, tid=tid)
        restored.chmod(0o600)
        restored.replace(out)
        with out.open("rb") as reader:
            digest = _copy_hashing(reader, lambda _chunk: None)
        if sync:
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return digest
    finally:
        jxl.unlink(missing_ok=True)


def assemble(staging: Ciphertext | Path, signed: SignedHeader, device_key: nacl.signing.VerifyKey,
             central_key: nacl.public.PrivateKey, *, max_plaintext: int, work_dir: Path,
             sync: bool = True) -> Assembled:
    """Verify, decrypt and unpack one received envelope into files under ``work_dir``.

    ``sync=False`` leaves the files to a later barrier (``central.ingest.durability``)."""
    header = signed.header
    package = work_dir / f"{header.tid}.tar"
    original = work_dir / f"{header.tid}.original"
    try:
        ciphertext_sha, package_sha = decrypt_to_file(staging, signed, device_key, central_key,
                                                      max_plaintext=max_plaintext, out=package, sync=sync)
        metadata, metadata_json, text, original_sha = unpack(
            package, device=header.device_id, tid=header.tid, seq=header.seq, original_out=original,
            sync=sync)
    except BaseException:
        for leftover in (package, original, original.with_suffix(".jxl"),
                         original.with_suffix(".restored.jpg")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    return Assembled(metadata, metadata_json, text, original, original_sha, package, package_sha,
                     ciphertext_sha)
