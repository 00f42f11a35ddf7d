"""Protocol error hierarchy: one class per distinct way a peer's bytes can be wrong.

Callers translate these into quarantine reasons (edge), rejection acks (central) and log lines;
every class carries an operator hint and the structured fields that identify the transfer.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base for everything a malformed or hostile peer can cause."""

    hint = "the peer sent bytes that do not follow sohoa/v1"

    def __init__(self, message: str, *, device: str | None = None, tid: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.device = device
        self.tid = tid
        self.offset = offset


class DecodeError(ProtocolError):
    """A message or topic could not be parsed (truncated, wrong length, bad field)."""


class TopicError(DecodeError):
    """A topic does not belong to the sohoa/v1 scheme or carries an invalid id."""


class TransferError(ProtocolError):
    """A segment or fin contradicts what the transfer already holds (conflicting overlap, size)."""

    hint = "the sender reused a transfer id for different bytes; abort and re-package"


class EnvelopeError(ProtocolError):
    """Base for envelope verification failures; nothing is decrypted after one of these."""

    hint = "the envelope is corrupt, forged or not meant for this central; keep it for forensics"


class HeaderError(EnvelopeError):
    """The signed header is malformed (magic, version, lengths, field values)."""


class SignatureError(EnvelopeError):
    """The Ed25519 signature does not verify with the device's key."""


class UnknownKeyError(EnvelopeError):
    """The header names a central key id this central does not hold."""


class CiphertextHashError(EnvelopeError):
    """The assembled ciphertext does not match the size or sha256 in the signed header."""


class DecryptError(EnvelopeError):
    """A chunk failed authentication, or the sealed key would not open."""


class TruncatedStreamError(EnvelopeError):
    """The stream ended before a TAG_FINAL chunk (an attacker dropped the tail)."""


class TrailingDataError(EnvelopeError):
    """Bytes follow the final chunk, or follow the end of the zstd frame."""


class SizeLimitError(EnvelopeError):
    """Decompressed output exceeds the signed declared size or the configured cap (a bomb)."""


class DecompressError(EnvelopeError):
    """The decrypted body is not a valid zstd frame."""


class ReceiptError(ProtocolError):
    """A receipt is malformed or its central signature does not verify."""


class BagError(ProtocolError):
    """A package (BagIt tar) is malformed or a file's sha256 disagrees with the manifest."""
