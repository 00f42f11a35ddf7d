"""The per-document envelope (DESIGN §4): zstd → secretstream → signed header.

Rules of the format:

1. A random 32-byte stream key encrypts the zstd-compressed package with XChaCha20-Poly1305
   secretstream in ``chunk_size`` chunks; every chunk but the last is TAG_MESSAGE, the last is
   TAG_FINAL. PyNaCl does not notice a missing final chunk, so the opener requires TAG_FINAL.
2. The stream key is sealed (X25519 ``SealedBox``) to central's public key: the edge box itself
   cannot decrypt its own outbox once the key is forgotten.
3. The header (in the clear) carries no file names or text — only what central needs to verify:
   device, document id, sequence number, central key id, sealed key, stream header, sizes and the
   sha256 of the ciphertext. The device's Ed25519 signature covers the whole header.
4. Central verifies the signature and then the ciphertext's size and sha256 *before* decrypting
   anything (:func:`verify_ciphertext` returns the token the opener requires).
5. The opener decompresses with a running cap equal to the signed plaintext size, checks the
   frame's declared content size first, and rejects bytes after the frame. It walks the frame's
   block headers and hands zstd at most one block's end per call, refusing blocks above zstd's
   128 KiB maximum, so one call never produces more than 128 KiB, however hostile the frame.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
import nacl.public
import nacl.signing
import zstandard

from protocol.errors import (
    CiphertextHashError,
    DecompressError,
    DecryptError,
    EnvelopeError,
    HeaderError,
    SignatureError,
    SizeLimitError,
    TrailingDataError,
    TruncatedStreamError,
    UnknownKeyError,
)
from protocol.names import DEVICE_ID_RE

MAGIC = b"SOHOAENV"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1024 * 1024
ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
HEADERBYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
KEYBYTES = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
SEALED_KEY_BYTES = KEYBYTES + sodium.crypto_box_SEALBYTES
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 8
DOC_ID_BYTES = 16
# A zstd block regenerates at most 128 KiB (Block_Maximum_Size; RFC 8878 §3.1.1.2.3). Its 3-byte
# header says how many input bytes follow it: 1 for an RLE block, Block_Size for raw or compressed.
_ZSTD_BLOCK_MAX = 128 * 1024
_ZSTD_BLOCK_HEADER = 3
_ZSTD_RLE, _ZSTD_RESERVED = 1, 3
_ZSTD_FRAME_HEADER_MAX = 18   # ZSTD_FRAMEHEADERSIZE_MAX: magic + descriptor + window + dict id + size
# The sealer's match-finder tables: level 10's own for a large package are a 4M-entry hash table
# and a 2M-entry chain (~25 MB resident on the edge while it seals a 500 MB scan, a third of the
# process). Capped at 256K entries each they cost ~2 MB; the 4 MiB window stays, and on scans
# (already-compressed images, or raw TIFF pages) and hOCR the output is the same size to 0.1 %.
_ZSTD_MAX_WINDOW_LOG = 22
_ZSTD_MAX_TABLE_LOG = 18

# magic, version, device-id length, device id (variable), then the fixed tail below.
_FIXED = struct.Struct(f">{DOC_ID_BYTES}sQ{KEY_ID_BYTES}s{SEALED_KEY_BYTES}s{HEADERBYTES}sIQQ32sQ")


def key_id(public_key: bytes) -> bytes:
    """Short identifier of a central X25519 public key (lets central rotate keys)."""
    return hashlib.sha256(b"sohoa-key-id\0" + public_key).digest()[:KEY_ID_BYTES]


def chunk_count(ciphertext_size: int, chunk_size: int) -> int:
    """Number of secretstream chunks in a ciphertext of this size (the last may be short)."""
    full = chunk_size + ABYTES
    return max(1, -(-ciphertext_size // full))


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The signed, in-the-clear part of an envelope. ``tid`` (transfer id) is the doc id in hex."""

    device_id: str
    doc_id: bytes
    seq: int
    central_key_id: bytes
    sealed_key: bytes
    stream_header: bytes
    chunk_size: int
    plaintext_size: int
    ciphertext_size: int
    ciphertext_sha256: bytes
    created_at: int

    def __post_init__(self) -> None:
        if not DEVICE_ID_RE.fullmatch(self.device_id):
            raise HeaderError(f"invalid device id {self.device_id!r}")
        checks = [
            (len(self.doc_id) == DOC_ID_BYTES, "doc_id must be 16 bytes"),
            (0 <= self.seq < 1 << 63, "seq out of range"),
            (len(self.central_key_id) == KEY_ID_BYTES, "central_key_id must be 8 bytes"),
            (len(self.sealed_key) == SEALED_KEY_BYTES, "sealed_key has the wrong length"),
            (len(self.stream_header) == HEADERBYTES, "stream_header has the wrong length"),
            (MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE, "chunk_size out of range"),
            (0 <= self.plaintext_size < 1 << 48, "plaintext_size out of range"),
            (ABYTES <= self.ciphertext_size < 1 << 48, "ciphertext_size out of range"),
            (len(self.ciphertext_sha256) == 32, "ciphertext_sha256 must be 32 bytes"),
            (0 <= self.created_at < 1 << 63, "created_at out of range"),
        ]
        for ok, message in checks:
            if not ok:
                raise HeaderError(message, device=self.device_id)
        # Every chunk carries ABYTES of overhead; a size that cannot be split into chunks is forged.
        chunks = chunk_count(self.ciphertext_size, self.chunk_size)
        last = self.ciphertext_size - (chunks - 1) * (self.chunk_size + ABYTES)
        if not ABYTES <= last <= self.chunk_size + ABYTES:
            raise HeaderError("ciphertext_size does not split into chunks", device=self.device_id)

    @property
    def tid(self) -> str:
        return self.doc_id.hex()

    def encode(self) -> bytes:
        device = self.device_id.encode("ascii")
        return (MAGIC + bytes([FORMAT_VERSION, len(device)]) + device + _FIXED.pack(
            self.doc_id, self.seq, self.central_key_id, self.sealed_key, self.stream_header,
            self.chunk_size, self.plaintext_size, self.ciphertext_size, self.ciphertext_sha256,
            self.created_at))

    @classmethod
    def decode(cls, data: bytes) -> EnvelopeHeader:
        if len(data) < len(MAGIC) + 2:
            raise HeaderError(f"header truncated at {len(data)} bytes")
        if data[: len(MAGIC)] != MAGIC:
            raise HeaderError("not a sohoa envelope (bad magic)")
        version, device_len = data[len(MAGIC)], data[len(MAGIC) + 1]
        if version != FORMAT_VERSION:
            raise HeaderError(f"unsupported envelope version {version}")
        start = len(MAGIC) + 2
        if len(data) != start + device_len + _FIXED.size:
            raise HeaderError(f"header is {len(data)} bytes, expected {start + device_len + _FIXED.size}")
        try:
            device = data[start: start + device_len].decode("ascii")
        except UnicodeDecodeError as exc:
            raise HeaderError("device id is not ASCII") from exc
        fields = _FIXED.unpack(data[start + device_len:])
        return cls(device, *fields)


@dataclass(frozen=True, slots=True)
class SignedHeader:
    """Header plus the device's Ed25519 signature over the encoded header."""

    header: EnvelopeHeader
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise HeaderError("signature must be 64 bytes", device=self.header.device_id)

    def encode(self) -> bytes:
        encoded = self.header.encode()
        return struct.pack(">H", len(encoded)) + encoded + self.signature

    @classmethod
    def decode(cls, data: bytes) -> SignedHeader:
        if len(data) < 2:
            raise HeaderError(f"signed header truncated at {len(data)} bytes")
        (length,) = struct.unpack(">H", data[:2])
        if len(data) != 2 + length + SIGNATURE_BYTES:
            raise HeaderError(f"signed header is {len(data)} bytes, expected {2 + length + SIGNATURE_BYTES}")
        return cls(EnvelopeHeader.decode(data[2: 2 + length]), data[2 + length:])

    def verify(self, device_key: nacl.signing.VerifyKey, *, context: bytes = b"") -> EnvelopeHeader:
        """Check the device's signature; raise :class:`SignatureError` if it does not verify.

        ``context`` separates what a signature is for: an envelope's is over the header alone, a
        notice's (``protocol.notice``) over a prefix plus the header, so neither passes for the other.
        """
        try:
            device_key.verify(context + self.header.encode(), self.signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise SignatureError("device signature does not verify", device=self.header.device_id,
                                 tid=self.header.tid) from exc
        return self.header


@dataclass(frozen=True, slots=True)
class VerifiedHeader:
    """Proof that the signature *and* the assembled ciphertext's size and hash were checked."""

    header: EnvelopeHeader


def verify_ciphertext(signed: SignedHeader, device_key: nacl.signing.VerifyKey, *, size: int,
                      sha256: bytes, context: bytes = b"") -> VerifiedHeader:
    """Verify signature, then the ciphertext size and hash against the signed header."""
    header = signed.verify(device_key, context=context)
    if size != header.ciphertext_size or sha256 != header.ciphertext_sha256:
        raise CiphertextHashError(
            f"ciphertext is {size} bytes sha256 {sha256.hex()[:16]}…, header says "
            f"{header.ciphertext_size} bytes {header.ciphertext_sha256.hex()[:16]}…",
            device=header.device_id, tid=header.tid)
    return VerifiedHeader(header)


def compression_params(level: int, size: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters for ``level`` and a ``size``-byte input, its tables capped (see above)."""
    base = zstandard.ZstdCompressionParameters.from_level(level, source_size=size)
    return zstandard.ZstdCompressionParameters.from_level(
        level, source_size=size, window_log=min(base.window_log, _ZSTD_MAX_WINDOW_LOG),
        hash_log=min(base.hash_log, _ZSTD_MAX_TABLE_LOG), chain_log=min(base.chain_log, _ZSTD_MAX_TABLE_LOG),
        write_checksum=1, write_content_size=1)


class EnvelopeSealer:
    """Streaming sealer: feed the package bytes, append the returned ciphertext, then finish().

    Memory is bounded by ``chunk_size`` whatever the package size.
    """

    def __init__(self, *, device_id: str, doc_id: bytes, seq: int,
                 signing_key: nacl.signing.SigningKey, central_public_key: nacl.public.PublicKey,
                 plaintext_size: int, created_at: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 level: int = 10, context: bytes = b"") -> None:
        # Fail before compressing and encrypting a whole package, not at finish().
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise HeaderError(f"invalid device id {device_id!r}")
        if len(doc_id) != DOC_ID_BYTES or not 0 <= seq < 1 << 63 or not 0 <= created_at < 1 << 63:
            raise HeaderError("doc_id must be 16 bytes; seq and created_at non-negative 63-bit",
                              device=device_id)
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or not 0 <= plaintext_size < 1 << 48:
            raise HeaderError("chunk_size or plaintext_size out of range", device=device_id)
        self._device_id = device_id
        self._doc_id = doc_id
        self._seq = seq
        self._signing_key = signing_key
        self._plaintext_size = plaintext_size
        self._created_at = created_at
        self._chunk_size = chunk_size
        self._context = context
        stream_key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
        self._central_key_id = key_id(bytes(central_public_key))
        self._sealed_key = nacl.public.SealedBox(central_public_key).encrypt(stream_key)
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._stream_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, stream_key)
        self._compressor = zstandard.ZstdCompressor(
            compression_params=compression_params(level, plaintext_size)
        ).compressobj(size=plaintext_size)
        self._pending = bytearray()
        self._fed = 0
        self._hash = hashlib.sha256()
        self._ciphertext_size = 0
        self._finished = False

    def update(self, data: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("sealer already finished")
        self._fed += len(data)
        if self._fed > self._plaintext_size:
            raise ValueError(f"fed {self._fed} bytes, declared {self._plaintext_size}")
        self._pending += self._compressor.compress(data)
        return self._drain(final=False)

    def finish(self) -> tuple[bytes, SignedHeader]:
        if self._finished:
            raise RuntimeError("sealer already finished")
        if self._fed != self._plaintext_size:
            raise ValueError(f"fed {self._fed} bytes, declared {self._plaintext_size}")
        self._pending += self._compressor.flush()
        tail = self._drain(final=True)
        self._finished = True
        header = EnvelopeHeader(
            device_id=self._device_id, doc_id=self._doc_id, seq=self._seq,
            central_key_id=self._central_key_id, sealed_key=self._sealed_key,
            stream_header=self._stream_header, chunk_size=self._chunk_size,
            plaintext_size=self._plaintext_size, ciphertext_size=self._ciphertext_size,
            ciphertext_sha256=self._hash.digest(), created_at=self._created_at)
        signature = self._signing_key.sign(self._context + header.encode()).signature
        return tail, SignedHeader(header, signature)

    def _drain(self, *, final: bool) -> bytes:
        out = bytearray()
        size = self._chunk_size
        # Keep at least one byte back until finish(): the last chunk must carry TAG_FINAL.
        while len(self._pending) > size or (final and len(self._pending) == size):
            out += self._push(bytes(self._pending[:size]), TAG_MESSAGE)
            del self._pending[:size]
        if final:
            out += self._push(bytes(self._pending), TAG_FINAL)
            self._pending.clear()
        return bytes(out)

    def _push(self, chunk: bytes, tag: int) -> bytes:
        encrypted: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, chunk, None, tag)
        self._hash.update(encrypted)
        self._ciphertext_size += len(encrypted)
        return encrypted


class EnvelopeOpener:
    """Streaming opener: feed ciphertext in any slicing; authenticated plaintext goes to ``sink``.

    Only a :class:`VerifiedHeader` is accepted, so nothing is decrypted before the signature and
    the ciphertext hash are checked. ``sink`` receives decompressed package bytes in pieces of at
    most a few MiB, and only from chunks that secretstream authenticated; the total is capped at the
    signed ``plaintext_size`` and at ``max_plaintext``. The opener also re-hashes the ciphertext it
    is fed, so ``finish`` fails unless exactly the verified bytes went through it. After any error
    the opener refuses further input: a half-failed stream is never resumed.
    """

    def __init__(self, verified: VerifiedHeader, central_private_key: nacl.public.PrivateKey, *,
                 max_plaintext: int, sink: Callable[[bytes], None]) -> None:
        header = verified.header
        self._header = header
        self._failed = False
        self._finished = False
        if header.central_key_id != key_id(bytes(central_private_key.public_key)):
            raise self._error(UnknownKeyError, f"envelope sealed to key id {header.central_key_id.hex()}, "
                              "not this central's key")
        if header.plaintext_size > max_plaintext:
            raise self._error(SizeLimitError, f"declared plaintext {header.plaintext_size} bytes exceeds "
                              f"the cap of {max_plaintext}")
        try:
            stream_key = nacl.public.SealedBox(central_private_key).decrypt(header.sealed_key)
        except nacl.exceptions.CryptoError as exc:
            raise self._error(DecryptError, "sealed stream key does not open") from exc
        if len(stream_key) != KEYBYTES:
            raise self._error(DecryptError, "sealed stream key has the wrong length")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                self._state, header.stream_header, stream_key)
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise self._error(DecryptError, "stream header rejected") from exc
        self._sink = sink
        self._buffer = bytearray()
        self._consumed = 0
        self._hash = hashlib.sha256()
        self._chunks_left = chunk_count(header.ciphertext_size, header.chunk_size)
        self._final_seen = False
        self._decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=False)
        self._frame_checked = False
        self._frame_prefix = bytearray()
        self._produced = 0
        # Where the block walk stands: header bytes of the next block gathered so far, input bytes
        # of the current block still to come, and whether the last block has been reached.
        self._block_header = bytearray()
        self._block_left = 0
        self._last_block = False
        self._blocks_done = False

    @property
    def produced(self) -> int:
        """Plaintext bytes handed to the sink so far."""
        return self._produced

    def update(self, ciphertext: bytes) -> None:
        self._check_usable()
        try:
            self._update(ciphertext)
        except BaseException:
            self._failed = True
            raise

    def finish(self) -> None:
        self._check_usable()
        self._failed = True   # whatever happens next, this opener is spent
        if self._chunks_left > 0 or not self._final_seen:
            raise self._error(TruncatedStreamError,
                              f"stream ended with {self._chunks_left} chunk(s) missing")
        if self._buffer:
            raise self._error(TrailingDataError, f"{len(self._buffer)} bytes after the final chunk")
        if self._consumed != self._header.ciphertext_size or (
                self._hash.digest() != self._header.ciphertext_sha256):
            raise self._error(CiphertextHashError, "the ciphertext fed to the opener is not the one "
                              "whose hash was verified")
        if not self._frame_checked:
            self._check_frame_header(bytes(self._frame_prefix))
        if not self._decompressor.eof:
            raise self._error(DecompressError, "zstd frame is incomplete")
        if self._produced != self._header.plaintext_size:
            raise self._error(SizeLimitError, f"package is {self._produced} bytes, header declared "
                              f"{self._header.plaintext_size}")
        self._finished = True

    def _check_usable(self) -> None:
        if self._finished:
            raise RuntimeError("opener already finished")
        if self._failed:
            raise RuntimeError("opener already failed; start again from a fresh opener")

    def _error(self, cls: type[EnvelopeError], message: str, offset: int | None = None) -> EnvelopeError:
        return cls(message, device=self._header.device_id, tid=self._header.tid, offset=offset)

    def _update(self, ciphertext: bytes) -> None:
        self._buffer += ciphertext
        full = self._header.chunk_size + ABYTES
        while self._chunks_left > 0:
            expected = full if self._chunks_left > 1 else (
                self._header.ciphertext_size - self._consumed)
            if len(self._buffer) < expected:
                break
            chunk = bytes(self._buffer[:expected])
            del self._buffer[:expected]
            self._hash.update(chunk)
            self._consumed += expected
            self._open_chunk(chunk, last=self._chunks_left == 1)
            self._chunks_left -= 1
        if self._chunks_left == 0 and self._buffer:
            raise self._error(TrailingDataError, f"{len(self._buffer)} bytes after the final chunk",
                              self._consumed)

    def _open_chunk(self, chunk: bytes, *, last: bool) -> None:
        offset = self._consumed - len(chunk)
        try:
            message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._state, chunk, None)
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise self._error(DecryptError, "chunk failed authentication (modified, reordered or "
                              "duplicated)", offset) from exc
        if tag == TAG_FINAL and not last:
            raise self._error(TrailingDataError, "TAG_FINAL before the end of the ciphertext", offset)
        if last and tag != TAG_FINAL:
            raise self._error(TruncatedStreamError, "last chunk is not TAG_FINAL (stream cut short)",
                              offset)
        if tag not in (TAG_MESSAGE, TAG_FINAL):
            raise self._error(DecryptError, f"unexpected secretstream tag {tag}", offset)
        self._final_seen = tag == TAG_FINAL
        self._decompress(message)

    def _decompress(self, data: bytes) -> None:
        if not self._frame_checked:
            # The frame header (at most 18 bytes) must be whole before its declared content size
            # can be checked; a short first chunk is held back until more arrives or the stream ends.
            self._frame_prefix += data
            if len(self._frame_prefix) < _ZSTD_FRAME_HEADER_MAX and not self._final_seen:
                return
            data = bytes(self._frame_prefix)
            self._frame_prefix.clear()
            header_size = self._check_frame_header(data)
            self._inflate(data[:header_size])
            data = data[header_size:]
        # One call per block end: the bytes up to the end of the current block (its header
        # included), so each call completes at most one block and produces at most 128 KiB.
        view = memoryview(data)
        start = position = 0
        while position < len(view) and not self._blocks_done:
            if self._block_left == 0:
                take = min(_ZSTD_BLOCK_HEADER - len(self._block_header), len(view) - position)
                self._block_header += view[position: position + take]
                position += take
                if len(self._block_header) < _ZSTD_BLOCK_HEADER:
                    break
                self._start_block(int.from_bytes(self._block_header, "little"))
                self._block_header.clear()
                if self._block_left > 0:
                    continue
            else:
                take = min(self._block_left, len(view) - position)
                position += take
                self._block_left -= take
                if self._block_left > 0:
                    break
            # The current block is complete within [start, position).
            self._inflate(view[start:position])
            start = position
            self._blocks_done = self._last_block
        if start < len(view):
            # A block's beginning (no block ends in it), or what follows the last block (checksum,
            # or trailing bytes that _inflate refuses).
            self._inflate(view[start:])

    def _start_block(self, header: int) -> None:
        kind, size = (header >> 1) & 3, header >> 3
        if kind == _ZSTD_RESERVED:
            raise self._error(DecompressError, "corrupt zstd data: reserved block type")
        if size > _ZSTD_BLOCK_MAX:
            raise self._error(DecompressError, f"corrupt zstd data: a block of {size} bytes "
                              f"(zstd blocks hold at most {_ZSTD_BLOCK_MAX})")
        self._block_left = 1 if kind == _ZSTD_RLE else size
        self._last_block = bool(header & 1)

    def _inflate(self, piece: bytes | memoryview) -> None:
        if not piece:
            return
        if self._decompressor.eof:
            raise self._error(TrailingDataError, "bytes after the end of the zstd frame")
        try:
            out = self._decompressor.decompress(piece)
        except zstandard.ZstdError as exc:
            raise self._error(DecompressError, f"corrupt zstd data: {exc}") from exc
        if self._decompressor.eof and self._decompressor.unused_data:
            raise self._error(TrailingDataError, "bytes after the end of the zstd frame")
        self._produced += len(out)
        if self._produced > self._header.plaintext_size:
            raise self._error(SizeLimitError, f"decompressed past the declared "
                              f"{self._header.plaintext_size} bytes (bomb or forged size)")
        if out:
            self._sink(out)

    def _check_frame_header(self, data: bytes) -> int:
        """Check the declared content size; return the frame header's length."""
        self._frame_checked = True
        try:
            params = zstandard.get_frame_parameters(data)
            header_size: int = zstandard.frame_header_size(data)
        except zstandard.ZstdError as exc:
            raise self._error(DecompressError, f"not a zstd frame: {exc}") from exc
        if params.content_size != self._header.plaintext_size:
            raise self._error(SizeLimitError, f"zstd frame declares {params.content_size} bytes, "
                              f"signed header {self._header.plaintext_size}")
        return header_size
