"""Central's long-lived keys: X25519 (devices encrypt to it) and Ed25519 (signs receipts).

Stored base64-encoded, one per 0600 file in a 0700 directory; never logged.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import nacl.public
import nacl.signing

from central.errors import ConfigError
from central.fsutil import make_private_dir, write_atomic
from central.paths import CentralPaths


@dataclass(frozen=True, slots=True)
class CentralKeys:
    encryption: nacl.public.PrivateKey = field(repr=False)
    receipt: nacl.signing.SigningKey = field(repr=False)

    @property
    def encryption_public_b64(self) -> str:
        return b64(bytes(self.encryption.public_key))

    @property
    def receipt_public_b64(self) -> str:
        return b64(bytes(self.receipt.verify_key))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str, *, what: str, length: int = 32) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what} is not base64") from exc
    if len(raw) != length:
        raise ConfigError(f"{what} is {len(raw)} bytes, expected {length}")
    return raw


def generate_keys(paths: CentralPaths) -> CentralKeys:
    make_private_dir(paths.keys)
    keys = CentralKeys(nacl.public.PrivateKey.generate(), nacl.signing.SigningKey.generate())
    write_atomic(paths.encryption_key, (b64(bytes(keys.encryption)) + "\n").encode())
    write_atomic(paths.receipt_key, (b64(bytes(keys.receipt)) + "\n").encode())
    return keys


def load_keys(paths: CentralPaths) -> CentralKeys:
    try:
        enc = paths.encryption_key.read_text(encoding="ascii")
        sig = paths.receipt_key.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"cannot read central keys in {paths.keys}: {exc.strerror}") from exc
    return CentralKeys(nacl.public.PrivateKey(unb64(enc, what=str(paths.encryption_key))),
                       nacl.signing.SigningKey(unb64(sig, what=str(paths.receipt_key))))
