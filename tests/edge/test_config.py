"""Edge configuration: strict TOML (unknown keys and bad values name the field), bundle loading,
and the priority rule for urgent scans."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
import tomli_w

from edge.cli import init
from edge.config import Bundle, ConfigError, IntakeConfig, from_mapping, load


def _bundle(tmp_path: Path, **broker_extra: str) -> Path:
    central = nacl.public.PrivateKey.generate()
    receipts = nacl.signing.SigningKey.generate()
    device = nacl.signing.SigningKey.generate()
    b64 = lambda raw: base64.b64encode(bytes(raw)).decode()  # noqa: E731
    document = {
        "format": "sohoa-bundle/1", "device_id": "xa-tan-trao",
        "broker": {"url": "mqtt://127.0.0.1:1883", "username": "xa-tan-trao", "password": "s3cret!",
                   **broker_extra},
        "central": {"encryption_public_key": b64(central.public_key),
                    "receipt_public_key": b64(receipts.verify_key)},
        "device": {"signing_key": b64(device)},
    }
    path = tmp_path / "bundle.toml"
    path.write_bytes(tomli_w.dumps(document).encode())
    return path


def test_init_writes_private_config_that_loads_back(tmp_path: Path) -> None:
    home = tmp_path / "edge"
    init(home, _bundle(tmp_path), tmp_path / "Máy quét")
    cfg = load(home)
    assert cfg.device_id == "xa-tan-trao" and cfg.watch_dir == (tmp_path / "Máy quét").resolve()
    assert (home / "edge.toml").stat().st_mode & 0o777 == 0o600
    assert cfg.key_path.stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    assert "s3cret!" not in repr(cfg)   # secrets stay out of reprs (and so out of logs)
    with pytest.raises(ConfigError, match="exists"):
        init(home, _bundle(tmp_path), tmp_path / "scans")


def test_bundle_with_a_broker_ca_pins_it(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    home = tmp_path / "edge"
    init(home, _bundle(tmp_path, ca_cert=pem, url="mqtts://archive.example:8883"), tmp_path / "s")
    cfg = load(home)
    assert cfg.broker.ca_file and Path(cfg.broker.ca_file).read_text() == pem
    with pytest.raises(ConfigError, match="ca_cert"):
        Bundle.load(_bundle(tmp_path, ca_cert="not a certificate"))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("uplink", "windw", 8, "unknown key.*uplink.windw"),
    ("uplink", "window", 0, "uplink.window = 0"),
    ("ocr", "languages", ["eng", "vie"], "put \"vie\" first"),
    ("intake", "quiet_seconds", "5", "expected a number"),
    ("retention", "keep_originals", "yes", "expected true or false"),
])
def test_bad_values_name_the_field(tmp_path: Path, section: str, key: str, value: object,
                                   message: str) -> None:
    home = tmp_path / "edge"
    init(home, _bundle(tmp_path), tmp_path / "scans")
    raw = tomllib.loads((home / "edge.toml").read_text())
    raw[section] = {key: value}
    with pytest.raises(ConfigError, match=message):
        from_mapping(raw, home=home)


def test_urgent_folders_and_names_get_priority() -> None:
    intake = IntakeConfig()
    assert intake.priority_of("KHẨN/Công văn số 5.pdf") == 1
    assert intake.priority_of("Công văn khẩn số 7.pdf") == 1
    assert intake.priority_of("Công văn số 8.pdf") == 0
    custom = IntakeConfig(urgent_globs=("Hỏa tốc/*",))
    assert custom.priority_of("Hỏa tốc/Quyết định.pdf") == 1


def test_errors_never_echo_a_secret(tmp_path: Path) -> None:
    home = tmp_path / "edge"
    init(home, _bundle(tmp_path), tmp_path / "scans")
    raw = tomllib.loads((home / "edge.toml").read_text())
    raw["broker"]["password"] = 271828182845
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw, home=home)
    assert "271828182845" not in str(caught.value) and "broker.password" in str(caught.value)
