"""The edge's typed, frozen configuration: ``HOME/edge.toml`` parsed, validated, explained.

Unknown keys are errors (a typo must not silently fall back to a default), and every error names
the field, the bad value and a hint. The config is passed explicitly; there are no globals.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nacl.public
import nacl.signing

from protocol.names import check_device_id, nfc

CONFIG_NAME = "edge.toml"
SECRET_KEYS = frozenset({"password", "signing_key"})   # never echoed in error messages
KEY_PATH = Path("keys") / "device.key"
BUNDLE_FORMAT = "sohoa-bundle/1"


class ConfigError(ValueError):
    """A config or bundle value is wrong; the message names the field, the value and a hint."""


def _positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} = {value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def _b64key(value: str, name: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{name}: not base64 ({exc})") from None
    if len(raw) != 32:
        raise ConfigError(f"{name}: expected a 32-byte key, got {len(raw)} bytes")
    return raw


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str
    username: str
    password: str = field(repr=False)
    ca_file: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not parts.port:
            raise ConfigError(f"broker.url = {self.url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")


@dataclass(frozen=True, slots=True)
class CentralKeys:
    encryption_public_key: str
    receipt_public_key: str

    def __post_init__(self) -> None:
        for name in ("encryption_public_key", "receipt_public_key"):
            _b64key(getattr(self, name), f"central.{name}")

    @property
    def encryption_key(self) -> nacl.public.PublicKey:
        return nacl.public.PublicKey(_b64key(self.encryption_public_key, "central.encryption_public_key"))

    @property
    def receipt_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(_b64key(self.receipt_public_key, "central.receipt_public_key"))


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    """When a file in the scan folder counts as a finished scan (``edge.settle`` has the rules)."""

    # Quiet after the writer closed the file (inotify close-write, or a rename into place).
    quiet_seconds: float = 5.0
    # Where no file events exist (network mounts, files there before start-up): the file's mtime
    # must be this old before it is taken.
    unknown_quiet_seconds: float = 60.0
    # A writer that keeps the file open and silent this long is taken anyway (a lost event); a
    # later write makes the box send the file again as a new version, nothing is lost.
    open_quiet_seconds: float = 600.0
    # A file that stays structurally incomplete (no PDF trailer, no PNG IEND…) and unchanged this
    # long is refused with a reason instead of waiting forever.
    incomplete_grace_seconds: float = 300.0
    rescan_seconds: float = 30.0
    check_interval: float = 1.0
    max_file_bytes: int = 512 * 1024 * 1024
    urgent_globs: tuple[str, ...] = ("*khẩn*", "*KHẨN*", "*khan*", "*KHAN*")
    # Inside the scan folder, so the clerk sees refused scans where they put them; never taken in.
    refused_folder: str = "_Lỗi"

    def __post_init__(self) -> None:
        _positive(self.quiet_seconds, "intake.quiet_seconds", allow_zero=True)
        _positive(self.unknown_quiet_seconds, "intake.unknown_quiet_seconds", allow_zero=True)
        _positive(self.open_quiet_seconds, "intake.open_quiet_seconds", allow_zero=True)
        _positive(self.incomplete_grace_seconds, "intake.incomplete_grace_seconds", allow_zero=True)
        _positive(self.rescan_seconds, "intake.rescan_seconds")
        _positive(self.check_interval, "intake.check_interval")
        _positive(self.max_file_bytes, "intake.max_file_bytes")
        folder = nfc(self.refused_folder)
        if folder != self.refused_folder or not folder or folder in (".", "..") or any(
                ch in folder for ch in "/\\\0"):
            raise ConfigError(f"intake.refused_folder = {self.refused_folder!r}: a plain folder name "
                              "(NFC, no slashes), e.g. \"_Lỗi\"")

    def priority_of(self, relative_path: str) -> int:
        """1 for urgent documents (a folder or file name matching ``urgent_globs``), else 0."""
        name = nfc(relative_path)
        return 1 if any(fnmatch.fnmatchcase(name, nfc(g)) for g in self.urgent_globs) else 0


@dataclass(frozen=True, slots=True)
class OcrConfig:
    languages: tuple[str, ...] = ("vie",)
    workers: int = 0
    dpi: int = 300
    engine: str = "tesseract"          # or "fake" (instant, for tests and demos without tesseract)
    orientation: str = "doubt"         # "doubt": OSD when a first reading is doubtful; "always"; "off"
    deskew: bool = True
    address_space_mib: int = 2048      # RLIMIT_AS per OCR worker and its tesseract; 0: no limit

    def __post_init__(self) -> None:
        if not self.languages:
            raise ConfigError("ocr.languages is empty: use [\"vie\"]")
        if self.languages[0] != "vie":
            raise ConfigError(f"ocr.languages = {list(self.languages)!r}: put \"vie\" first "
                              "(eng+vie strips Vietnamese diacritics)")
        if self.workers < 0:
            raise ConfigError(f"ocr.workers = {self.workers}: use 0 for one per core")
        if not 70 <= self.dpi <= 600:
            raise ConfigError(f"ocr.dpi = {self.dpi}: use 300 (70..600)")
        if self.engine not in ("tesseract", "fake"):
            raise ConfigError(f"ocr.engine = {self.engine!r}: use \"tesseract\" (or \"fake\" in tests)")
        if self.orientation not in ("doubt", "always", "off"):
            raise ConfigError(f"ocr.orientation = {self.orientation!r}: use \"doubt\", \"always\" or \"off\"")
        if self.address_space_mib and self.address_space_mib < 512:
            raise ConfigError(f"ocr.address_space_mib = {self.address_space_mib}: use 2048 "
                              "(at least 512; 0 for no limit)")

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    segment_size: int = 32 * 1024
    window: int = 8
    rate_kbit: float = 0.0
    max_active: int = 2
    resend_after: float = 30.0
    status_interval: float = 30.0

    def __post_init__(self) -> None:
        if not 1024 <= self.segment_size <= 1024 * 1024:
            raise ConfigError(f"uplink.segment_size = {self.segment_size}: use 16384..65536 (1 KiB..1 MiB)")
        if not 1 <= self.window <= 64:
            raise ConfigError(f"uplink.window = {self.window}: use 4..8")
        _positive(self.rate_kbit, "uplink.rate_kbit", allow_zero=True)
        _positive(self.max_active, "uplink.max_active")
        _positive(self.resend_after, "uplink.resend_after")
        _positive(self.status_interval, "uplink.status_interval")


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    cap_bytes: int = 8 * 1024**3
    # A TTL that only raises an alarm: unsent archives are never deleted for being old.
    alarm_after_hours: float = 72.0

    def __post_init__(self) -> None:
        _positive(self.cap_bytes, "outbox.cap_bytes")
        _positive(self.alarm_after_hours, "outbox.alarm_after_hours")


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    keep_originals: bool = False
    # After central's receipt, the original waits this long (and is then re-hashed) before it is
    # deleted: a scanner that still writes into a file the box took early is caught, not lost.
    release_after_seconds: float = 60.0

    def __post_init__(self) -> None:
        _positive(self.release_after_seconds, "retention.release_after_seconds", allow_zero=True)


@dataclass(frozen=True, slots=True)
class StatusPageConfig:
    """The clerk's read-only status page and the box's /metrics (edge.statuspage)."""

    # On the office LAN by default: the clerk opens http://BOX:8090/ from the office PC. It shows
    # file names and reasons, nothing else, and changes nothing; set a LAN address (or 127.0.0.1)
    # to narrow it, or enabled = false to turn it off.
    listen: str = "0.0.0.0:8090"
    enabled: bool = True

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"status_page.listen = {self.listen!r}: expected HOST:PORT, "
                              "e.g. \"0.0.0.0:8090\"")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class LogConfig:
    # Re-read on SIGHUP (with the uplink rate and the alarm threshold) without a restart.
    level: str = "info"

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level = {self.level!r}: use debug, info, warning or error")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    home: Path
    device_id: str
    watch_dir: Path
    broker: BrokerConfig
    central: CentralKeys
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    status_page: StatusPageConfig = field(default_factory=StatusPageConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        try:
            check_device_id(self.device_id)
        except ValueError as exc:
            raise ConfigError(f"device_id = {self.device_id!r}: {exc}") from exc

    # The edge's own folders live in its home, never inside the watch folder.
    @property
    def outbox_path(self) -> Path:
        return self.home / "outbox.db"

    @property
    def envelopes_dir(self) -> Path:
        return self.home / "envelopes"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def processed_dir(self) -> Path:
        return self.home / "processed"

    @property
    def legacy_failed_dir(self) -> Path:
        """Where refused scans went before they were handed back to the clerk (moved on start)."""
        return self.home / "failed"

    @property
    def refused_dir(self) -> Path:
        return self.watch_dir / self.intake.refused_folder

    @property
    def status_path(self) -> Path:
        return self.home / "status.json"

    @property
    def key_path(self) -> Path:
        return self.home / KEY_PATH

    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(_b64key(self.key_path.read_text().strip(), str(self.key_path)))


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig, "central": CentralKeys, "intake": IntakeConfig, "ocr": OcrConfig,
    "uplink": UplinkConfig, "outbox": OutboxConfig, "retention": RetentionConfig,
    "status_page": StatusPageConfig,
    "log": LogConfig,
}


def load(home: Path) -> EdgeConfig:
    path = home / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `sohoa edge init --home {home} --bundle FILE "
                          "--watch SCAN_DIR` first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return from_mapping(raw, home=home, source=str(path))


def from_mapping(raw: dict[str, Any], *, home: Path, source: str = "edge.toml") -> EdgeConfig:
    top = {"device_id", "watch_dir", *_SECTIONS}
    _no_unknown(raw, top, source)
    for required in ("device_id", "watch_dir", "broker", "central"):
        if required not in raw:
            raise ConfigError(f"{source}: `{required}` is missing")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            sections[name] = _section(cls, raw[name], f"{source} [{name}]", name)
    return EdgeConfig(home=home, device_id=str(raw["device_id"]), watch_dir=Path(raw["watch_dir"]),
                      **sections)


def _section(cls: type, value: Any, where: str, name: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name for f in fields(cls)}
    _no_unknown(value, known, where, prefix=name + ".")
    types = {f.name: f.type for f in fields(cls)}
    converted: dict[str, Any] = {}
    for key, raw_item in value.items():
        expected = str(types[key])
        item = raw_item
        shown = "<redacted>" if key in SECRET_KEYS else repr(raw_item)
        if "tuple" in expected:
            if not isinstance(item, list) or not all(isinstance(x, str) for x in item):
                raise ConfigError(f"{name}.{key} = {shown}: expected a list of strings")
            converted[key] = tuple(item)
            continue
        if expected == "bool" and not isinstance(item, bool):
            raise ConfigError(f"{name}.{key} = {shown}: expected true or false")
        if expected == "int" and (isinstance(item, bool) or not isinstance(item, int)):
            raise ConfigError(f"{name}.{key} = {shown}: expected an integer")
        if expected == "float" and (isinstance(item, bool) or not isinstance(item, int | float)):
            raise ConfigError(f"{name}.{key} = {shown}: expected a number")
        if expected.startswith("str") and not isinstance(item, str):
            raise ConfigError(f"{name}.{key} = {shown}: expected a string")
        converted[key] = float(item) if expected == "float" else item
    try:
        return cls(**converted)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _no_unknown(raw: dict[str, Any], known: set[str], where: str, prefix: str = "") -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")


@dataclass(frozen=True, slots=True)
class Bundle:
    """The secret enrollment bundle written by ``sohoa central enroll``."""

    device_id: str
    broker: BrokerConfig
    central: CentralKeys
    signing_key: str = field(repr=False)

    ca_cert: str | None = None   # PEM of the broker's CA when the bundle says mqtts://

    @classmethod
    def load(cls, path: Path) -> Bundle:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"bundle {path}: {exc}") from exc
        where = f"bundle {path}"
        _no_unknown(raw, {"format", "device_id", "broker", "central", "device"}, where)
        if raw.get("format") != BUNDLE_FORMAT:
            raise ConfigError(f"{where}: format = {raw.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        device = raw.get("device")
        if not isinstance(device, dict) or set(device) != {"signing_key"}:
            raise ConfigError(f"{where}: [device] must hold exactly signing_key")
        _b64key(device["signing_key"], "device.signing_key")
        broker = raw.get("broker")
        ca_cert = None
        if isinstance(broker, dict) and "ca_cert" in broker:
            broker = dict(broker)
            ca_cert = broker.pop("ca_cert")
            if not isinstance(ca_cert, str) or "BEGIN CERTIFICATE" not in ca_cert:
                raise ConfigError(f"{where}: broker.ca_cert is not a PEM certificate")
        return cls(device_id=str(raw.get("device_id")),
                   broker=_section(BrokerConfig, broker, where, "broker"),
                   central=_section(CentralKeys, raw.get("central"), where, "central"),
                   signing_key=device["signing_key"], ca_cert=ca_cert)
