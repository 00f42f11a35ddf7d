"""central.toml: parsed once into a typed, frozen config that every component receives explicitly.

Unknown keys are errors (a typo must not silently fall back to a default), and every error names the
field, the bad value and a hint.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from central.errors import ConfigError, HomeError
from central.paths import CentralPaths

CONFIG_FORMAT = "sohoa-central/1"
DEFAULT_MAX_PLAINTEXT = 2 * 1024 * 1024 * 1024
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
CENTRAL_CLIENT_ID = "sohoa-central"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    url: str
    username: str
    password: str = field(repr=False)
    client_id: str = CENTRAL_CLIENT_ID
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    # What enrolled devices dial (their own listener). Empty only in homes made before issue 7, whose
    # broker had one listener for everyone: devices then dial ``url``.
    device_url: str = ""

    @property
    def address(self) -> HostPort:
        return parse_broker_url(self.url)

    @property
    def devices_dial(self) -> str:
        return self.device_url or self.url

    @property
    def device_tls(self) -> bool:
        return parse_device_url(self.devices_dial)[0]

    @property
    def device_address(self) -> HostPort:
        return parse_device_url(self.devices_dial)[1]


@dataclass(frozen=True, slots=True)
class IngestSettings:
    max_plaintext_bytes: int = DEFAULT_MAX_PLAINTEXT
    # Messages per batch; batches waiting behind the writer are committed together (one journal
    # fsync and one WAL commit per group, however many transfers it touched).
    batch_max: int = 512
    batches_in_flight: int = 4
    # Unacked messages the broker may push at central (MQTT v5 Receive Maximum): enough for several
    # batches to be on their way while one is being committed.
    receive_maximum: int = 2048
    # Threads assembling complete transfers: hashing, decrypting and storing release the GIL, and
    # storing waits on fsyncs, so more threads than cores keep the disk and the cores busy.
    assemblers: int = 16
    # 0: assemble on those threads; N: in N processes (spawned at start), for the cores the GIL keeps
    # the threads from using (tar parsing, the glue around hashing and decrypting).
    assembler_processes: int = 0
    # How stored bytes are made durable before an ack or receipt: "syncfs" (one barrier per group
    # commit, Linux; give central's home its own filesystem) or "fsync" (every file and directory).
    durability: str = "syncfs"
    # Per-device quotas at admission (central.ingest.quota; the numbers are argued in DECISIONS.md): a
    # box runs 2 transfers at once (uplink.max_active) and, at 256 kbit/s, starts at most about one a
    # second even with tiny scans. Over a quota a new transfer is deferred, never refused.
    max_open_transfers_per_device: int = 8
    max_open_bytes_per_device: int = 1024 * 1024 * 1024
    new_transfers_per_hour: int = 1800
    new_transfers_burst: int = 120
    # Rejections an honest box never causes (bad signatures, bombs, bag errors): over this many in the
    # window the device is flagged in the fleet view and slowed (1 open transfer, this many an hour).
    rejected_transfers_budget: int = 10
    rejected_transfers_window_hours: int = 24
    flagged_new_transfers_per_hour: int = 6
    # A receiving transfer without progress this long has its bytes dropped; the box starts it again.
    expire_after_hours: int = 72
    # Messages a device may send (central.ingest.rate): beyond them they are dropped unread, and the
    # box resends what it still needs answered. An honest box on 3G sends about one a second.
    max_messages_per_second: int = 200
    max_messages_burst: int = 2000


# Appended to the [ingest] table `central init` writes (the last table), so an operator sees the knobs.
INGEST_DEFAULTS_COMMENT = """\
# Per-device quotas (docs/DECISIONS.md, "A hostile enrolled device"); the defaults:
# max_open_transfers_per_device = 8              # receiving at once; a box runs uplink.max_active = 2
# max_open_bytes_per_device = 1073741824         # announced, not yet stored (one transfer always fits)
# new_transfers_per_hour = 1800                  # token bucket: 0.5 a second sustained ...
# new_transfers_burst = 120                      # ... after a burst of 120 (a backlog after an outage)
# rejected_transfers_budget = 10                 # bombs, bad signatures, bag errors in the window ...
# rejected_transfers_window_hours = 24           # ... before the box is flagged and slowed to
# flagged_new_transfers_per_hour = 6             # this many new transfers an hour, one open at a time
# expire_after_hours = 72                        # no progress this long: bytes dropped, resent from zero
# max_messages_per_second = 200                  # per device, beyond a burst of ... (dropped unread,
# max_messages_burst = 2000                      # ... the box resends what it needs answered)
"""


@dataclass(frozen=True, slots=True)
class CentralConfig:
    home: Path
    broker: BrokerSettings
    http: HostPort
    ingest: IngestSettings
    api_token: str = field(repr=False)
    # [catalog] url = "postgresql://…": the ingest's catalog (devices, transfers, segments, jobs,
    # arrivals) on PostgreSQL, shared by several workers. Empty: the SQLite catalog.db in the home.
    catalog_url: str = field(default="", repr=False)
    log_level: str = "info"      # re-read on SIGHUP without a restart

    @property
    def paths(self) -> CentralPaths:
        return CentralPaths(self.home)


def parse_broker_url(url: str) -> HostPort:
    """``mqtt://HOST:PORT`` → host and port; anything else is a ConfigError naming the value."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "mqtt" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"broker.url = {url!r} is not mqtt://HOST:PORT",
                          hint="e.g. --broker mqtt://127.0.0.1:1883 (central's own loopback listener; "
                               "devices get TLS through --device-broker mqtts://HOST:8883)")
    return HostPort(parts.hostname, port)


def parse_device_url(url: str) -> tuple[bool, HostPort]:
    """``mqtts://HOST:PORT`` (TLS) or ``mqtt://HOST:PORT`` → (tls, address)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port is None or (
            parts.path not in ("", "/")):
        raise ConfigError(f"broker.device_url = {url!r} is not mqtts://HOST:PORT or mqtt://HOST:PORT",
                          hint="e.g. --device-broker mqtts://archive.tuyenquang.gov.vn:8883")
    return parts.scheme == "mqtts", HostPort(parts.hostname, port)


def parse_host_port(value: str, what: str = "http.listen") -> HostPort:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} = {value!r} is not HOST:PORT", hint="e.g. 127.0.0.1:8080")
    return HostPort(host.strip("[]"), int(port))


class _Table:
    """A TOML table that remembers which keys were read, so leftovers can be reported."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._seen: set[str] = set()

    def _get(self, key: str, kind: type, default: Any) -> Any:
        self._seen.add(key)
        name = f"{self._prefix}{key}"
        if key not in self._data:
            if default is _REQUIRED:
                raise ConfigError(f"{name} is missing", hint=f"add {name} to central.toml")
            return default
        value = self._data[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ConfigError(f"{name} = {value!r} must be a {kind.__name__}")
        return value

    def text(self, key: str, default: Any = None) -> str:
        return str(self._get(key, str, _REQUIRED if default is None else default))

    def integer(self, key: str, default: Any = None, *, minimum: int = 0) -> int:
        value = int(self._get(key, int, _REQUIRED if default is None else default))
        if value < minimum:
            raise ConfigError(f"{self._prefix}{key} = {value} must be at least {minimum}")
        return value

    def table(self, key: str) -> _Table:
        value = self._get(key, dict, {})
        return _Table(value, f"{self._prefix}{key}.")

    def finish(self) -> None:
        for key in self._data:
            if key not in self._seen:
                raise ConfigError(f"unknown key {self._prefix}{key} = {self._data[key]!r} in central.toml",
                                  hint="remove it or check its spelling against `sohoa central init`")


_REQUIRED = object()


def parse_config(home: Path, data: dict[str, Any], api_token: str) -> CentralConfig:
    root = _Table(data, "")
    fmt = root.text("format")
    if fmt != CONFIG_FORMAT:
        raise ConfigError(f"format = {fmt!r} is not {CONFIG_FORMAT!r}", hint="this central is too old or new")
    b = root.table("broker")
    broker = BrokerSettings(url=b.text("url"), username=b.text("username"), password=b.text("password"),
                            client_id=b.text("client_id", CENTRAL_CLIENT_ID),
                            session_expiry_s=b.integer("session_expiry_s", DEFAULT_SESSION_EXPIRY_S),
                            device_url=b.text("device_url", ""))
    broker.address  # noqa: B018 - validate the URL now, not at first connect
    if broker.device_url:
        parse_device_url(broker.device_url)
    b.finish()
    h = root.table("http")
    http = parse_host_port(h.text("listen"))
    h.finish()
    i = root.table("ingest")
    ingest = IngestSettings(
        max_plaintext_bytes=i.integer("max_plaintext_bytes", DEFAULT_MAX_PLAINTEXT, minimum=1024),
        batch_max=i.integer("batch_max", 512, minimum=1),
        batches_in_flight=i.integer("batches_in_flight", 4, minimum=1),
        receive_maximum=i.integer("receive_maximum", 2048, minimum=1),
        assemblers=i.integer("assemblers", 16, minimum=1),
        assembler_processes=i.integer("assembler_processes", 0, minimum=0),
        durability=i.text("durability", "syncfs"),
        max_open_transfers_per_device=i.integer("max_open_transfers_per_device", 8, minimum=1),
        max_open_bytes_per_device=i.integer("max_open_bytes_per_device", 1024 ** 3, minimum=1024 * 1024),
        new_transfers_per_hour=i.integer("new_transfers_per_hour", 1800, minimum=1),
        new_transfers_burst=i.integer("new_transfers_burst", 120, minimum=1),
        rejected_transfers_budget=i.integer("rejected_transfers_budget", 10, minimum=1),
        rejected_transfers_window_hours=i.integer("rejected_transfers_window_hours", 24, minimum=1),
        flagged_new_transfers_per_hour=i.integer("flagged_new_transfers_per_hour", 6, minimum=1),
        expire_after_hours=i.integer("expire_after_hours", 72, minimum=1),
        max_messages_per_second=i.integer("max_messages_per_second", 200, minimum=1),
        max_messages_burst=i.integer("max_messages_burst", 2000, minimum=1))
    if ingest.durability not in ("syncfs", "fsync"):
        raise ConfigError(f"ingest.durability = {ingest.durability!r} is not 'syncfs' or 'fsync'",
                          hint="syncfs: one barrier per group commit (Linux); fsync: every file")
    if ingest.receive_maximum > 65535:
        raise ConfigError(f"ingest.receive_maximum = {ingest.receive_maximum} is above MQTT's 65535")
    i.finish()
    lg = root.table("log")
    log_level = lg.text("level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level = {log_level!r} is not debug, info, warning or error")
    lg.finish()
    c = root.table("catalog")
    catalog_url = c.text("url", "")
    if catalog_url and not catalog_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"catalog.url = {catalog_url.split('@')[-1]!r} is not postgresql://…",
                          hint="e.g. postgresql://sohoa@127.0.0.1:5432/sohoa, or leave it out for SQLite")
    c.finish()
    root.finish()
    return CentralConfig(home=home, broker=broker, http=http, ingest=ingest, api_token=api_token,
                         log_level=log_level, catalog_url=catalog_url)


def load_config(home: Path) -> CentralConfig:
    paths = CentralPaths(home)
    if not paths.config.is_file():
        raise HomeError(f"{paths.config} does not exist")
    try:
        data = tomllib.loads(paths.config.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    try:
        token = paths.api_token.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise HomeError(f"cannot read {paths.api_token}: {exc.strerror}") from exc
    if len(token) < 32:
        raise ConfigError(f"{paths.api_token} holds a token shorter than 32 characters",
                          hint="re-run `sohoa central init` or write a longer random token")
    return parse_config(home, data, token)


def render_config(*, broker_url: str, http: str, password: str, device_url: str = "") -> dict[str, Any]:
    """The dict init writes with tomli_w (validated by parsing it back)."""
    broker: dict[str, Any] = {"url": broker_url, "username": "central", "password": password,
                              "client_id": CENTRAL_CLIENT_ID, "session_expiry_s": DEFAULT_SESSION_EXPIRY_S}
    if device_url:
        broker["device_url"] = device_url
    return {
        "format": CONFIG_FORMAT,
        "broker": broker,
        "http": {"listen": http},
        "ingest": {"max_plaintext_bytes": DEFAULT_MAX_PLAINTEXT, "batch_max": 512},
    }
