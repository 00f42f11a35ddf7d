"""The archive's signature on its archival copies (Decree 30/2020 annex I: a digitised copy is
signed by the digitising body): PAdES baseline B-B, invisible, added as an incremental update so the
PDF/A bytes before it are kept as they are.

The signing identity (an ECDSA P-256 key and a self-signed certificate naming the archive) is
made once, e.g. by ``central init``; an archive with a certificate from a recognised CA puts that
key and certificate in the same two files instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from central.errors import CentralError
from central.fsutil import fsync_dir, write_atomic

DEFAULT_ARCHIVE_NAME = "Lưu trữ số hóa sohoa"
KEY_NAME = "archive-signing-key.pem"
CERT_NAME = "archive-signing-cert.pem"


class SigningIdentityError(CentralError):
    """The archive's signing key or certificate is missing, unreadable or mismatched."""

    hint = ("the archive signing key lives in HOME/keys/; it is never replaced automatically: restore it "
            "from backup, or move the broken pair away so a new one is made on the next start")


def make_signing_identity(directory: Path, *, archive_name: str, days: int = 3650) -> tuple[Path, Path]:
    """Create the archive's signing key (0600) and a self-signed certificate; return their paths.

    Never overwrites a key: the certificate is written first (public, replaced if a crash left one
    without a key), then the key is linked into place, which fails if one already exists. So a key on
    disk always has its certificate beside it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, archive_name[:64]),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ký số bản lưu trữ"),
                      x509.NameAttribute(NameOID.COMMON_NAME, archive_name[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, cert_path = directory / KEY_NAME, directory / CERT_NAME
    if key_path.exists():
        raise SigningIdentityError(f"{key_path} already exists; an archive signing key is never replaced")
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = directory / f".{KEY_NAME}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, key_path)   # atomic, and refuses to replace a key another process just made
    except FileExistsError as exc:
        raise SigningIdentityError(f"{key_path} already exists; an archive signing key is never "
                                   "replaced") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(directory)
    return key_path, cert_path


def ensure_signing_identity(directory: Path, *, archive_name: str) -> bool:
    """Make the archive's signing identity unless it exists; True if it was made now.

    An existing key is kept whatever it is; it must have its certificate, and they must match.
    """
    key_path = directory / KEY_NAME
    if not key_path.exists():
        try:
            make_signing_identity(directory, archive_name=archive_name)
        except SigningIdentityError:
            pass   # another process made it first: check it like any existing one
        else:
            return True
    check_signing_identity(directory)
    return False


def check_signing_identity(directory: Path) -> x509.Certificate:
    """The archive's certificate, after checking that it belongs to the key beside it."""
    key_path, cert_path = directory / KEY_NAME, directory / CERT_NAME
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningIdentityError(f"cannot load the archive signing key {key_path} and certificate "
                                   f"{cert_path}: {exc}") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
            serialization.Encoding.DER, public):
        raise SigningIdentityError(f"{cert_path} does not belong to the key {key_path}")
    return cert


def sign_pdf(unsigned: Path, signed: Path, *, key: Path, cert: Path, reason: str,
             location: str = "Việt Nam") -> None:
    """Append a PAdES B-B signature by the archive to ``unsigned``, written to ``signed``."""
    signer = signers.SimpleSigner.load(str(key), str(cert))  # type: ignore[no-untyped-call]
    if signer is None:
        raise ValueError(f"cannot load the archive's signing key {key} and certificate {cert}")
    meta = signers.PdfSignatureMetadata(
        field_name="ArchiveSignature", reason=reason, location=location, md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES)
    with unsigned.open("rb") as source, signed.open("wb") as sink:
        writer = IncrementalPdfFileWriter(source)
        signers.sign_pdf(writer, meta, signer=signer, output=sink)
