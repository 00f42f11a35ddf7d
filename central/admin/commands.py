"""The operator commands as plain functions: the CLI and the demo call these, tests too.

``init`` makes a home (keys, config, broker files, API token), ``enroll`` adds one device and
writes its secret bundle, ``revoke``, ``user_*``, ``token_*`` and ``verify`` change or check one home.
Running a central worker is ``central.worker``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import tomli_w

from central import catalog
from central.admin import operators, tls
from central.admin.broker_config import (
    CENTRAL_USER,
    add_users,
    is_ip,
    reload_broker,
    remove_user,
    write_broker_files,
)
from central.config import (
    CENTRAL_CLIENT_ID,
    INGEST_DEFAULTS_COMMENT,
    CentralConfig,
    HostPort,
    load_config,
    parse_broker_url,
    parse_config,
    parse_device_url,
    parse_host_port,
    render_config,
)
from central.errors import ConfigError, DeviceError, EnrollError, HomeError
from central.fsutil import make_private_dir, write_atomic
from central.keys import b64, generate_keys, load_keys
from central.paths import CentralPaths
from protocol.errors import DecodeError
from protocol.names import check_device_id

log = logging.getLogger("sohoa.central")

BUNDLE_FORMAT = "sohoa-bundle/1"
# A device's username is its MQTT client id on the device listener: it must never be central's
# account nor central's client id (client ids are one namespace across listeners).
RESERVED_DEVICE_IDS = frozenset({CENTRAL_USER, CENTRAL_CLIENT_ID})


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def init(home: Path, *, broker_url: str = "mqtt://127.0.0.1:1883", http: str = "127.0.0.1:8080",
         device_url: str | None = None, tls_certs: tls.OperatorCerts | None = None,
         allow_plaintext: bool = False, archive_name: str | None = None) -> None:
    """Create a central home: keys, central.toml, broker config, password files, ACLs, API token, and
    the archive's signing key with a self-signed certificate naming ``archive_name``
    (``archive_sign.DEFAULT_ARCHIVE_NAME`` if None).

    The broker gets two listeners: ``broker_url`` is central's own (loopback, central's account
    only), ``device_url`` the devices' (``mqtts://HOST:PORT`` adds TLS with a generated CA and server
    certificate for HOST, or ``tls_certs``). Without ``device_url`` devices get plain MQTT on the
    next port of central's host (tests, the local demo).
    """
    paths = CentralPaths(home)
    if paths.config.exists():
        raise HomeError(f"{paths.config} already exists",
                        hint="this home is initialised; use another --home or remove it first")
    listen = parse_broker_url(broker_url)
    parse_host_port(http)
    if device_url is None:
        device_url = default_device_url(listen)
    devices_tls, devices = parse_device_url(device_url)
    if _clash(listen, devices):
        raise ConfigError(f"--device-broker {device_url} uses central's port {listen.port}",
                          hint="devices and central have a listener each: give devices another port")
    if listen.host not in LOOPBACK_HOSTS and (devices_tls or not allow_plaintext):
        # Central's account must not cross a network in the clear; its listener is for it alone.
        raise ConfigError(f"--broker {broker_url} is not loopback: central's password would cross a "
                          "network without TLS",
                          hint="central's own listener stays on 127.0.0.1; devices dial --device-broker "
                               "(--insecure-plaintext allows a closed lab network)")
    if not devices_tls and devices.host not in LOOPBACK_HOSTS and not allow_plaintext:
        # Security is default-on: passwords and signed envelopes must not cross a real network
        # in the clear just because a flag was forgotten.
        raise ConfigError(f"devices would dial {device_url} without TLS",
                          hint="add --device-broker mqtts://HOST:PORT (a CA and certificate are "
                               "generated), or --insecure-plaintext for a closed lab network")
    if tls_certs is not None and not devices_tls:
        raise ConfigError("TLS certificates given but the device URL is not mqtts://",
                          hint="add --device-broker mqtts://HOST:PORT")
    password = secrets.token_urlsafe(32)
    token = secrets.token_urlsafe(32)
    rendered = render_config(broker_url=broker_url, http=http, password=password, device_url=device_url)
    parse_config(home, rendered, token)   # never write a config we would refuse to load
    # All or nothing: whatever fails below (openssl, a certificate that does not load, a full disk),
    # what this run created is removed, so a retry starts from where the operator started.
    before = set(home.iterdir()) if home.is_dir() else None
    try:
        for directory in paths.private_dirs():
            make_private_dir(directory)
        generate_keys(paths)
        # Imported here: pyHanko and cryptography are central's archive, not every `sohoa` command's.
        from central.records.archive_sign import DEFAULT_ARCHIVE_NAME, ensure_signing_identity  # noqa: PLC0415

        # never replaced: the archive certificate signs every archival copy
        ensure_signing_identity(paths.keys, archive_name=archive_name or DEFAULT_ARCHIVE_NAME)
        if devices_tls:
            if tls_certs is None:
                tls.generate(paths, devices.host)
            else:
                tls.install(paths, tls_certs)
        write_broker_files(paths, listen, password, devices, device_tls=devices_tls)
        write_atomic(paths.api_token, (token + "\n").encode())
        catalog.connect(paths.catalog).close()
        # The config goes last: its presence is what marks the home as initialised.
        write_atomic(paths.config, (tomli_w.dumps(rendered) + INGEST_DEFAULTS_COMMENT).encode())
    except BaseException:
        _undo_init(home, before)
        raise


def _undo_init(home: Path, before: set[Path] | None) -> None:
    """Remove what a failed init created: the whole home if it made it, else only the new entries."""
    if before is None:
        shutil.rmtree(home, ignore_errors=True)
        return
    for entry in set(home.iterdir()) - before:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _clash(central: HostPort, devices: HostPort) -> bool:
    """Would the two listeners bind the same address and port? (A DNS name binds every interface.)"""
    wildcard = {"0.0.0.0", "::"}  # noqa: S104 - compared against, never bound
    if central.port != devices.port:
        return False
    hosts = {central.host, devices.host}
    return len(hosts) == 1 or bool(hosts & wildcard) or not is_ip(devices.host)


def default_device_url(central: HostPort) -> str:
    """Plain MQTT on the port after central's, on central's host: the loopback setup of the demo."""
    if central.port >= 65535:
        raise ConfigError(f"--broker port {central.port} leaves no next port for devices",
                          hint="give --device-broker mqtt://HOST:PORT explicitly")
    host = f"[{central.host}]" if ":" in central.host else central.host
    return f"mqtt://{host}:{central.port + 1}"


@dataclass(frozen=True, slots=True)
class Enrollment:
    device_id: str
    out: Path                     # where its secret bundle is written (0600)
    replaces: str | None = None   # the revoked device this box replaces (its held scans come from it)


def enroll(home: Path, device_id: str, out: Path, *, replaces: str | None = None) -> None:
    """Enroll a device: signing key, catalog row, broker account (live), and its 0600 bundle."""
    enroll_many(home, [Enrollment(device_id, out, replaces)])


def read_enrollment_csv(path: Path, out_dir: Path) -> list[Enrollment]:
    """``devices.csv`` → enrolments: a ``device_id`` column (and optionally ``replaces``, the revoked
    device a box replaces; other columns, such as a commune's name for the inventory, are ignored), or
    ids in the first column without a header."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise EnrollError(f"{path} lists no device")
    header = [cell.strip().lower() for cell in rows[0]]
    column = header.index("device_id") if "device_id" in header else 0
    body = rows[1:] if "device_id" in header else rows
    old = header.index("replaces") if "device_id" in header and "replaces" in header else None

    def cell(row: list[str], at: int | None) -> str:
        return row[at].strip() if at is not None and at < len(row) else ""

    return [Enrollment(cell(row, column), out_dir / f"{cell(row, column)}.toml", cell(row, old) or None)
            for row in body]


def _check_replacements(conn: sqlite3.Connection, devices: list[Enrollment]) -> None:
    """A box replaces a device that exists, is revoked (its identity must never send again: the
    replacement sends what it held) and is not already replaced; one replacement per device."""
    claimed: set[str] = set()
    for item in devices:
        old = item.replaces
        if old is None:
            continue
        if old == item.device_id or old in claimed:
            raise EnrollError(f"device {old!r} cannot be replaced twice (or by itself)")
        claimed.add(old)
        record = catalog.get_device(conn, old)
        if record is None:
            raise EnrollError(f"{item.device_id!r} replaces {old!r}, which is not an enrolled device")
        if record.status == "active":
            raise EnrollError(f"{item.device_id!r} replaces {old!r}, which is still active",
                              hint=f"revoke it first: sohoa central revoke {old} --home DIR")
        successor = conn.execute("SELECT id FROM devices WHERE replaces = ?", (old,)).fetchone()
        if successor is not None:
            raise EnrollError(f"device {old!r} is already replaced by {successor[0]!r}",
                              hint=f"replace {successor[0]} instead (the chain is followed back)")


def enroll_many(home: Path, devices: list[Enrollment]) -> None:
    """Enroll devices together: every id is checked first (nothing is written if one is bad), then
    one catalog transaction, one password-file rewrite and one broker reload for all of them."""
    config = load_config(home)
    paths = config.paths
    seen: set[str] = set()
    for item in devices:
        device_id = item.device_id
        try:
            check_device_id(device_id)
        except DecodeError as exc:
            raise EnrollError(str(exc)) from exc
        if device_id in RESERVED_DEVICE_IDS or device_id.startswith(f"{CENTRAL_CLIENT_ID}-"):
            # Client ids are one namespace across listeners: sohoa-central-NAME are central's workers.
            raise EnrollError(f"device id {device_id!r} is reserved")
        if device_id in seen:
            raise EnrollError(f"device id {device_id!r} is listed twice")
        seen.add(device_id)
    keys = load_keys(paths)
    ca = tls.ca_pem(paths) if config.broker.device_tls else None   # public: lets the box check the broker
    made: list[tuple[str, Path, nacl.signing.SigningKey, str]] = [
        (item.device_id, item.out, nacl.signing.SigningKey.generate(), secrets.token_urlsafe(32))
        for item in devices]
    replaces = {item.device_id: item.replaces for item in devices}
    conn = catalog.connect(paths.catalog)
    try:
        conn.execute("BEGIN IMMEDIATE")
        _check_replacements(conn, devices)
        for device_id, _, signing_key, _ in made:
            try:
                catalog.add_device(conn, device_id, bytes(signing_key.verify_key),
                                   replaces=replaces[device_id])
            except sqlite3.IntegrityError as exc:
                raise EnrollError(f"device {device_id!r} is already enrolled") from exc
        # Bundles first, then broker accounts, then commit: a failure leaves no half-enrolled device.
        for device_id, out, signing_key, password in made:
            broker: dict[str, str] = {"url": config.broker.devices_dial, "username": device_id,
                                      "password": password}
            if ca is not None:
                broker["ca_cert"] = ca
            bundle = {
                "format": BUNDLE_FORMAT,
                "device_id": device_id,
                "broker": broker,
                "central": {"encryption_public_key": keys.encryption_public_b64,
                            "receipt_public_key": keys.receipt_public_b64},
                "device": {"signing_key": b64(bytes(signing_key))},
            }
            write_atomic(out, tomli_w.dumps(bundle).encode(), mode=0o600)
        add_users(paths, {device_id: password for device_id, _, _, password in made})

        def add_all(db: Any) -> None:
            for device_id, _, signing_key, _ in made:
                db.add_device(device_id, bytes(signing_key.verify_key), replaces=replaces[device_id])

        _on_ingest_catalog(config, add_all)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()
    pid = reload_broker(paths)
    log.info("enrolled %d device(s)%s", len(made), f"; broker {pid} reloaded" if pid else "")


def _on_ingest_catalog(config: CentralConfig, change: Callable[[Any], object]) -> None:
    """Apply a device change to the ingest's PostgreSQL catalog too, when there is one (the SQLite
    catalog stays the home of operators, sessions and the HTTP side's reads)."""
    if not config.catalog_url:
        return
    from central.ingest import pgstore  # noqa: PLC0415 - psycopg only with a PostgreSQL catalog

    with pgstore.connect(config.catalog_url, ensure_schema=True) as conn, conn.transaction():
        change(pgstore.PostgresIngestStore(conn))


@dataclass(frozen=True, slots=True)
class Revoked:
    device_id: str
    was_active: bool            # False: it was already revoked (the broker side is re-applied anyway)
    broker_pid: int | None      # the broker that was told to reload; None if none was found running
    awaiting_originals: int = 0  # its arrivals catalogued from notices whose originals never came


def revoke(home: Path, device_id: str, *, actor: str = "cli") -> Revoked:
    """Revoke a device: catalog first (central refuses its envelopes), then its broker account.

    Order matters: once the catalog says revoked, every message central processes from then on is
    refused, whatever the broker still delivers; removing the account and SIGHUPing Mosquitto
    then cuts the live session and refuses new logins. Repeating it is harmless.
    """
    paths = load_config(home).paths
    with _audited_change(home) as conn:
        device = catalog.get_device(conn, device_id)
        if device is None:
            raise DeviceError(f"no enrolled device {device_id!r}")
        catalog.set_device_status(conn, device_id, "revoked")
        awaiting = catalog.awaiting_load(conn, device_id)[0]
        catalog.add_audit(conn, actor=actor, action="revoke_device", target=device_id)
        _on_ingest_catalog(load_config(home), lambda db: db.set_device_status(device_id, "revoked"))
    remove_user(paths, device_id)
    pid = reload_broker(paths)
    log.info("revoked %s%s", device_id, f"; broker {pid} reloaded" if pid else "; no running broker found")
    return Revoked(device_id, device.status == "active", pid, awaiting)


@dataclass(frozen=True, slots=True)
class CloneCleared:
    device_id: str
    was_flagged: bool
    suspicion: dict[str, Any] | None    # what the flag said (first seen, count, tids) before clearing


def clear_clone(home: Path, device_id: str, *, actor: str = "cli") -> CloneCleared:
    """Clear a device's possible-clone flag, audited: an admin has re-enrolled one of the two boxes.

    The refused transfers stay recorded (``seq_collisions``); a new collision raises the flag again.
    """
    with _audited_change(home) as conn:
        if catalog.get_device(conn, device_id) is None:
            raise DeviceError(f"no enrolled device {device_id!r}")
        suspicion = catalog.possible_clone(conn, device_id)
        flagged = catalog.clear_possible_clone(conn, device_id)
        catalog.add_audit(conn, actor=actor, action="clear_clone", target=device_id,
                          detail=json.dumps(suspicion) if suspicion else None)
    log.info("possible-clone flag of %s %s", device_id, "cleared" if flagged else "was not set")
    return CloneCleared(device_id, flagged, suspicion)


@contextlib.contextmanager
def _audited_change(home: Path) -> Iterator[sqlite3.Connection]:
    """One catalog transaction for an administrative change: committed only if the body (and its
    audit row) completed, always closed."""
    conn = catalog.connect(load_config(home).paths.catalog)
    try:
        yield conn
        conn.commit()
    finally:
        conn.close()


def user_add(home: Path, name: str, role: str, password: str, *, actor: str = "cli") -> None:
    """Create an operator, or replace its role and password (argon2id)."""
    with _audited_change(home) as conn:
        operators.add_operator(conn, name, role, password)
        catalog.add_audit(conn, actor=actor, action="user_add", target=name, detail=role)


def user_list(home: Path) -> list[dict[str, Any]]:
    with _audited_change(home) as conn:
        return operators.list_operators(conn)


def user_remove(home: Path, name: str, *, actor: str = "cli") -> None:
    """Disable an operator and end its sessions (kept as a row: the audit log names it)."""
    with _audited_change(home) as conn:
        if not operators.remove_operator(conn, name):
            raise operators.OperatorError(f"no active operator named {name!r}")
        catalog.add_audit(conn, actor=actor, action="user_remove", target=name)


def token_list(home: Path) -> list[dict[str, Any]]:
    with _audited_change(home) as conn:
        return operators.list_tokens(conn)


def device_list(home: Path) -> list[dict[str, Any]]:
    with _audited_change(home) as conn:
        return catalog.list_devices(conn)


def device_remove(home: Path, device_id: str, *, actor: str = "cli") -> None:
    """Remove an enrolled device that never sent anything (a typo, a box never installed).

    A device that sent a transfer stays (its documents' provenance names it): revoke it instead.
    """
    paths = load_config(home).paths
    with _audited_change(home) as conn:
        if catalog.get_device(conn, device_id) is None:
            raise DeviceError(f"no enrolled device {device_id!r}")
        sent = sum(conn.execute(f"SELECT count(*) FROM {table} WHERE device = ?",  # noqa: S608 - fixed names
                                (device_id,)).fetchone()[0]
                   for table in ("transfers", "notices", "documents"))
        if sent:
            raise DeviceError(f"device {device_id!r} has sent {sent} transfer(s) or notice(s); its documents "
                              "name it",
                              hint=f"revoke it instead: sohoa central revoke {device_id} --home {home}")
        successor = conn.execute("SELECT id FROM devices WHERE replaces = ?", (device_id,)).fetchone()
        if successor is not None:
            raise DeviceError(f"device {device_id!r} is replaced by {successor[0]!r}, which names it",
                              hint=f"revoke it instead: sohoa central revoke {device_id} --home {home}")
        for table in ("device_history", "seq_collisions"):
            conn.execute(f"DELETE FROM {table} WHERE device = ?", (device_id,))  # noqa: S608 - fixed names
        conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
        catalog.add_audit(conn, actor=actor, action="device_remove", target=device_id)
    remove_user(paths, device_id)
    reload_broker(paths)


def token_create(home: Path, name: str, role: str = "viewer", *, actor: str = "cli") -> str:
    """A new API token; only its sha256 is kept, so this is the one time it can be shown."""
    token = secrets.token_urlsafe(32)
    with _audited_change(home) as conn:
        operators.create_token(conn, name, role, token)
        catalog.add_audit(conn, actor=actor, action="token_create", target=name, detail=role)
    return token


def token_revoke(home: Path, name: str, *, actor: str = "cli") -> None:
    with _audited_change(home) as conn:
        if not operators.revoke_token(conn, name):
            raise operators.OperatorError(f"no active token named {name!r}")
        catalog.add_audit(conn, actor=actor, action="token_revoke", target=name)


def verify(home: Path, *, actor: str = "cli") -> list[str]:
    """Re-hash every stored object (originals, packages, archival copies), record the outcome as fixity
    events, and return the problems (see ``central.catalog.fixity.verify_store``)."""
    from central.catalog.fixity import verify_store  # noqa: PLC0415 - keeps the other commands free of aiohttp

    paths = load_config(home).paths
    catalog.connect(paths.catalog).close()   # an older catalog is migrated first (a no-op when current)
    return verify_store(paths, actor=actor).problems
