"""The device listener's TLS material: a private CA and a server certificate, or the operator's own.

Generated with the ``openssl`` CLI (Debian ships it; the ``cryptography`` package is not in the
venv and is not worth a new dependency for three commands). EC P-256 keys; the server certificate
names the host devices dial (IP or DNS SAN), so paho's default hostname check passes. The CA key
stays in ``HOME/tls`` (0600) to re-issue the server certificate; devices get only ``ca.pem``.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from central.errors import ConfigError
from central.fsutil import make_private_dir, write_atomic
from central.paths import CentralPaths

CA_DAYS = 3650
SERVER_DAYS = 825
OPENSSL_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class OperatorCerts:
    """Certificates an operator brings (e.g. from the province's PKI) instead of generated ones."""

    cert: Path      # server certificate chain, PEM
    key: Path       # its private key, PEM
    ca: Path        # the CA devices must trust, PEM


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("openssl not found",
                          hint="apt-get install openssl, or pass --tls-cert/--tls-key/--tls-ca")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, timeout=OPENSSL_TIMEOUT_S,  # noqa: S603
                          check=False)
    if done.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')[-500:]}")


def subject_alt_name(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"


def generate(paths: CentralPaths, host: str) -> None:
    """A fresh CA and a server certificate for ``host`` in ``HOME/tls``."""
    make_private_dir(paths.tls_dir)
    with tempfile.TemporaryDirectory(dir=paths.tls_dir) as scratch:
        work = Path(scratch)
        (work / "server.ext").write_text(
            f"subjectAltName = {subject_alt_name(host)}\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n")
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(CA_DAYS),
                 "-subj", "/O=sohoa/CN=sohoa central device CA",
                 "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)
        _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
                 "-subj", f"/O=sohoa/CN={host}", cwd=work)
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "server.pem", "-days", str(SERVER_DAYS),
                 "-extfile", "server.ext", cwd=work)
        for name, target in (("ca.key", paths.tls_ca_key), ("ca.pem", paths.tls_ca),
                             ("server.key", paths.tls_key), ("server.pem", paths.tls_cert)):
            write_atomic(target, (work / name).read_bytes(), mode=0o600)


def install(paths: CentralPaths, certs: OperatorCerts) -> None:
    """Copy operator-provided PEM files into ``HOME/tls`` (0600), checking they look like PEM."""
    make_private_dir(paths.tls_dir)
    for source, target, marker in ((certs.cert, paths.tls_cert, b"-----BEGIN CERTIFICATE-----"),
                                   (certs.key, paths.tls_key, b"PRIVATE KEY-----"),
                                   (certs.ca, paths.tls_ca, b"-----BEGIN CERTIFICATE-----")):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror}") from exc
        if marker not in data:
            raise ConfigError(f"{source} is not a PEM file with {marker.decode().strip('-')}")
        write_atomic(target, data, mode=0o600)


def ca_pem(paths: CentralPaths) -> str:
    try:
        return paths.tls_ca.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"cannot read the device CA {paths.tls_ca}: {exc.strerror}") from exc
