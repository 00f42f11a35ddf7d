"""Admin commands: init is all or nothing; users, tokens and devices can be listed and removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from central import catalog
from central.admin import commands, tls
from central.admin.operators import OperatorError
from central.cli import register
from central.config import load_config
from central.errors import ConfigError, DeviceError
from tests.support.broker import free_port


def test_failed_init_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    for home in (tmp_path / "new-home", tmp_path / "empty-home"):
        if home.name == "empty-home":
            home.mkdir()
            (home / "keep.txt").write_text("the operator's own file\n")
        with pytest.raises(ConfigError):
            commands.init(home, broker_url=f"mqtt://127.0.0.1:{free_port()}",
                          device_url="mqtts://archive.example.vn:8883",
                          tls_certs=tls.OperatorCerts(bad, bad, bad))
        if home.name == "new-home":
            assert not home.exists()
        else:
            assert sorted(p.name for p in home.iterdir()) == ["keep.txt"]
    # And the same home then initialises cleanly.
    commands.init(tmp_path / "new-home", broker_url=f"mqtt://127.0.0.1:{free_port()}")
    assert load_config(tmp_path / "new-home").paths.catalog.exists()


def test_users_tokens_devices_list_and_remove(home: Path, enroll: object, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    commands.user_add(home, "an", "operator", "mật khẩu đủ dài")
    commands.user_add(home, "binh", "viewer", "mật khẩu đủ dài")
    commands.token_create(home, "backup", "viewer")
    assert [(u["name"], u["role"], u["disabled"]) for u in commands.user_list(home)] == [
        ("an", "operator", False), ("binh", "viewer", False)]
    commands.user_remove(home, "binh")
    assert [u["disabled"] for u in commands.user_list(home)] == [False, True]
    with pytest.raises(OperatorError):
        commands.user_remove(home, "binh")
    commands.user_add(home, "binh", "viewer", "mật khẩu mới đủ dài")   # enables it again
    assert all(not u["disabled"] for u in commands.user_list(home))
    commands.token_revoke(home, "backup")
    tokens = commands.token_list(home)
    assert [t["name"] for t in tokens] == ["backup"] and tokens[0]["revoked_at"]
    assert "token_hash" not in tokens[0]

    commands.enroll(home, "xa-go-nham", tmp_path / "typo.toml")
    commands.enroll(home, "xa-da-gui", tmp_path / "sent.toml")
    conn = catalog.connect(load_config(home).paths.catalog)
    catalog.insert_transfer(conn, tid="a" * 32, device="xa-da-gui", seq=1, header=b"h")
    conn.commit()
    conn.close()
    assert [d["id"] for d in commands.device_list(home)] == ["xa-da-gui", "xa-go-nham"]
    commands.device_remove(home, "xa-go-nham")
    with pytest.raises(DeviceError, match="has sent 1 transfer") as refused:
        commands.device_remove(home, "xa-da-gui")
    assert "revoke" in refused.value.hint
    assert [d["id"] for d in commands.device_list(home)] == ["xa-da-gui"]
    assert "xa-go-nham" not in (home / "mosquitto.passwd").read_text()

    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for argv in (["central", "user", "list", "--home", str(home)],
                 ["central", "token", "list", "--home", str(home)],
                 ["central", "device", "list", "--home", str(home)]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "NAME" in out and "binh" in out and "xa-da-gui" in out and "backup" in out
