"""Where everything lives under a central home directory (one place, so nothing guesses paths)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def worker_slug(worker: str) -> str:
    """A worker's name (its MQTT client id) as it appears in file names: its journal files, its
    lock and its work directory. Several workers share one home; each of them owns only these."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", worker)[:64] or "central"


@dataclass(frozen=True, slots=True)
class CentralPaths:
    home: Path

    @property
    def config(self) -> Path:
        return self.home / "central.toml"

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def encryption_key(self) -> Path:
        return self.keys / "encryption.key"

    @property
    def receipt_key(self) -> Path:
        return self.keys / "receipt.key"

    @property
    def api_token(self) -> Path:
        return self.home / "api-token"

    @property
    def mosquitto_conf(self) -> Path:
        return self.home / "mosquitto.conf"

    @property
    def mosquitto_passwd(self) -> Path:
        """The device listener's password file: one account per enrolled device."""
        return self.home / "mosquitto.passwd"

    @property
    def mosquitto_acl(self) -> Path:
        return self.home / "mosquitto.acl"

    @property
    def central_passwd(self) -> Path:
        """Central's own listener: a password file with central's account only."""
        return self.home / "mosquitto-central.passwd"

    @property
    def central_acl(self) -> Path:
        return self.home / "mosquitto-central.acl"

    @property
    def mosquitto_pid(self) -> Path:
        return self.home / "mosquitto.pid"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def tls_ca(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def tls_ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def tls_cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def tls_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def catalog(self) -> Path:
        return self.home / "catalog.db"

    @property
    def staging(self) -> Path:
        return self.home / "staging"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def worker_tmp(self, worker: str) -> Path:
        """Where one worker assembles: its own, so a worker starting up clears only its own
        leftovers, never the half-written files of another worker on the same home."""
        return self.tmp / worker_slug(worker)

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    def worker_lock(self, worker: str) -> Path:
        return self.locks / f"{worker_slug(worker)}.lock"

    @property
    def objects(self) -> Path:
        return self.home / "storage" / "objects"

    def private_dirs(self) -> tuple[Path, ...]:
        """Directories created 0700 by init and checked at start-up."""
        return (self.home, self.keys, self.broker_dir, self.staging, self.quarantine, self.tmp,
                self.home / "storage", self.objects)
