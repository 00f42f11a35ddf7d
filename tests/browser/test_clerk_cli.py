"""`sohoa edge status` for the clerk: Vietnamese (English with LANG=en), counts that match the lists,
readable by the status group without root, and honest when the service is not running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from central.config import load_config
from edge.clerk import VIEW_NAME
from tests.browser.conftest import REFUSED_NAME, Scene

SOHOA = str(Path(sys.executable).with_name("sohoa"))


def _status(home: Path, *, lang: str = "vi_VN.UTF-8", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LANG": lang, "LC_ALL": ""}
    return subprocess.run([*prefix, SOHOA, "edge", "status", "--home", str(home)], capture_output=True, text=True,
                          env=env, check=False, timeout=60)


def test_status_in_vietnamese_and_english(scene: Scene) -> None:
    deadline = time.monotonic() + 20   # the service rewrites its view within seconds of a change
    while "đã lưu trữ 1" not in (vi := _status(scene.edge_home)).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vi.returncode == 0, vi.stderr
    out = vi.stdout
    assert "Dịch vụ: đang chạy" in out
    assert "Kết nối về kho trung tâm: Đã kết nối" in out
    assert "Bị từ chối (trong thư mục _Lỗi): 1" in out
    assert f"  {REFUSED_NAME} (" in out and "Tệp không phải là bản quét PDF, JPEG, PNG hoặc TIFF." in out
    # The pipeline's order, and the refused count is the length of the list below it.
    assert "Số tài liệu theo trạng thái: đang xử lý 0 · chờ gửi 0 · đang gửi 0 · đã lưu trữ 1 · bị từ chối 1" in out
    assert f"{scene.scan_name} — Đã lưu trữ ở kho trung tâm" in out
    assert "Traceback" not in vi.stderr
    en = _status(scene.edge_home, lang="en_GB.UTF-8")
    assert "Service: running" in en.stdout and "Refused (in the _Lỗi folder): 1" in en.stdout
    report = json.loads(subprocess.run([SOHOA, "edge", "status", "--home", str(scene.edge_home), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert report["service_running"] is True and len(report["failed"]) == 1 and report["online"] is True


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_status_readable_by_the_group_without_root(scene: Scene) -> None:
    """A copy of the status files in a 2710 home of group 'users': nobody + users reads them; nobody
    without the group is refused in one line (exit 77), not a traceback. The outbox is never needed."""
    users = 100
    top = Path(tempfile.mkdtemp(prefix="sohoa-group-"))
    try:
        top.chmod(0o711)
        home = top / "edge"
        home.mkdir(mode=0o700)
        os.chown(home, 0, users)
        home.chmod(0o2710)
        for name in ("status.json", VIEW_NAME):
            shutil.copyfile(scene.edge_home / name, home / name)
            os.chown(home / name, 0, users)
            (home / name).chmod(0o640)
        view = json.loads((home / VIEW_NAME).read_text())
        view["written_at"] = time.time()
        (home / VIEW_NAME).write_text(json.dumps(view))
        member = _status(home, prefix=("setpriv", "--reuid=65534", "--regid=65534", f"--groups={users}"))
        assert member.returncode == 0, member.stderr
        assert "Dịch vụ: đang chạy" in member.stdout and REFUSED_NAME in member.stdout
        stranger = _status(home, prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
        # Not in the group: refused in one line with the permission exit code, never a traceback.
        assert stranger.returncode == 77 and "Traceback" not in stranger.stderr, stranger.stderr
        assert "Permission denied" in stranger.stderr and stranger.stdout == ""
        # A stale view: the service is said not to run, with when it last reported.
        view["written_at"] = time.time() - 600
        (home / VIEW_NAME).write_text(json.dumps(view))
        stale = _status(home, prefix=("setpriv", "--reuid=65534", "--regid=65534", f"--groups={users}"))
        assert "Dịch vụ: KHÔNG CHẠY (báo cáo cuối lúc" in stale.stdout
        assert "Kết nối về kho trung tâm: Mất kết nối" in stale.stdout
    finally:
        shutil.rmtree(top)


def test_an_acknowledged_error_clears_everywhere(scene: Scene) -> None:
    """The refused scan left a last error on the box; `sohoa edge ack` clears it on the box, in the
    status view and at central (the next status the box publishes carries none)."""
    token = load_config(scene.central_home).api_token

    def central_error() -> object:
        request = urllib.request.Request(f"{scene.url}/api/devices/xa-tan-trao",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["last_error"]

    assert scene.service.alarms.current_error() is not None
    assert subprocess.run([SOHOA, "edge", "ack", "--home", str(scene.edge_home)], check=False,
                          capture_output=True, text=True, env={**os.environ, "LANG": "vi_VN.UTF-8"}
                          ).stdout.startswith("Đã ghi nhận")
    def view_error() -> object:
        return json.loads((scene.edge_home / VIEW_NAME).read_text())["last_error"]

    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and (central_error(), scene.service.alarms.last_error, view_error()) != (
            None, None, None):
        time.sleep(0.5)
    assert scene.service.alarms.last_error is None
    assert central_error() is None
    assert view_error() is None
