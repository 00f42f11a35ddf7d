"""`sohoa edge init --force` never strands a queue: it refuses, or (--abandon-queue) moves it aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from central.admin import commands
from edge import cli as edge_cli
from edge.config import ConfigError
from edge.outbox import Outbox
from tests.support.broker import free_port


async def test_force_refuses_to_strand_unsent_documents(tmp_path: Path) -> None:
    central = tmp_path / "central"
    commands.init(central, broker_url=f"mqtt://127.0.0.1:{free_port()}")
    for device in ("xa-cu", "xa-moi"):
        commands.enroll(central, device, tmp_path / f"{device}.toml")
    home, scans = tmp_path / "edge", tmp_path / "scans"
    edge_cli.init(home, tmp_path / "xa-cu.toml", scans)
    outbox = await Outbox.open(home / "outbox.db")
    await outbox.add(name="Quyết định.pdf", src_path=str(scans / "Quyết định.pdf"), size=10, sha256="0" * 64,
                     media_type="application/pdf", pages=1)
    await outbox.close()
    assert edge_cli.unsent(home / "outbox.db") == 1
    with pytest.raises(ConfigError, match="1 document"):
        edge_cli.init(home, tmp_path / "xa-moi.toml", scans, force=True)
    assert "xa-cu" in (home / "edge.toml").read_text()   # unchanged
    edge_cli.init(home, tmp_path / "xa-moi.toml", scans, force=True, abandon_queue=True)
    assert "xa-moi" in (home / "edge.toml").read_text()
    aside = [p for p in home.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and edge_cli.unsent(aside[0] / "outbox.db") == 1
    assert edge_cli.unsent(home / "outbox.db") == 0
    # An empty queue needs no flag.
    edge_cli.init(home, tmp_path / "xa-moi.toml", scans, force=True)


async def test_status_after_reinit_with_another_bundle(tmp_path: Path) -> None:
    """The old identity's status files are not this box's: shown as never reported, no traceback."""
    import json  # noqa: PLC0415

    from edge.clerk import VIEW_NAME  # noqa: PLC0415
    from protocol.messages import Status, encode  # noqa: PLC0415

    central = tmp_path / "central"
    commands.init(central, broker_url=f"mqtt://127.0.0.1:{free_port()}")
    for device in ("xa-cu", "xa-moi"):
        commands.enroll(central, device, tmp_path / f"{device}.toml")
    home, scans = tmp_path / "edge", tmp_path / "scans"
    edge_cli.init(home, tmp_path / "xa-cu.toml", scans)
    (home / "status.json").write_bytes(encode(Status("xa-cu", online=True, last_error="cũ"))[1])
    (home / VIEW_NAME).write_text(json.dumps({"device": "xa-cu", "written_at": 9e12, "online": True}))
    edge_cli.init(home, tmp_path / "xa-moi.toml", scans, force=True)
    report = await edge_cli.status_report(home)
    assert report["device_id"] == "xa-moi" and report["service_running"] is False
    assert report["last_error"] is None and report["online"] is False
    text = edge_cli.render_status(report, "vi")
    assert "Thiết bị: xa-moi" in text and "KHÔNG CHẠY (chưa từng báo cáo)" in text
