"""A real deployment for the browser tests, built once: Mosquitto, central, one running edge box.

Five boxes in the states an operator must tell apart: ``xa-tan-trao`` live (a real EdgeService
sending real scans, its clerk page on a loopback port, one refused scan), ``xa-da-dung`` stopped
(its last will said offline, documents left on it), ``xa-chua-ket-noi`` enrolled and never
connected, ``xa-thu-hoi`` revoked, ``xa-nhan-ban`` a possible clone (two transfers signed with one
sequence number). Central and the edge run in a thread with their own event loop, so the tests
drive Debian's chromium through Playwright's sync API.

Screenshots go to ``artifacts/browser/`` (gitignored), or ``$SOHOA_ARTIFACTS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from central import worker as central_worker
from central.admin import commands as central_commands
from central.paths import CentralPaths
from edge import cli as edge_cli
from edge import config as edge_config
from edge.ocr import FakeOcrEngine
from edge.samples import generate_samples
from edge.service import EdgeService
from protocol.messages import Status, encode
from tests.central.builders import seal_document
from tests.central.conftest import read_bundle
from tests.central.test_broker import connected
from tests.central.test_service import send_and_wait_receipt
from tests.support.broker import free_port, running_broker

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SOHOA_ARTIFACTS", ROOT / "artifacts" / "browser"))
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"

LIVE, STOPPED, NEVER, REVOKED, CLONE = (
    "xa-tan-trao",
    "xa-da-dung",
    "xa-chua-ket-noi",
    "xa-thu-hoi",
    "xa-nhan-ban",
)
OCR_TEXT = (
    "ỦY BAN NHÂN DÂN XÃ TÂN TRÀO\nQuyết định về việc sáp nhập thôn Khuôn Điển vào thôn Tân Lập "
    "và đặt tên thôn mới sau khi sáp nhập"
)
CLONE_TEXT = "Công văn về công tác phòng, chống lụt bão và tìm kiếm cứu nạn năm 2024 của xã"
REFUSED_NAME = "Ghi chú họp thôn.txt"
PASSWORD = "mật-khẩu-đủ-dài-2024"


@dataclass
class Scene:
    url: str  # central's dashboard
    clerk_url: str  # the live box's status page
    central_home: Path
    edge_home: Path
    scan_name: str  # the live box's delivered scan
    scan_sha256: str
    loop: asyncio.AbstractEventLoop
    service: EdgeService

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _wait(predicate: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


async def _speak(port: int, bundle: Any, status: Status) -> None:
    async with connected(port, bundle.username, bundle.password, ()) as device:
        await device.publish(*encode(status))


async def _clone(port: int, bundle: Any, central_key: Any) -> None:
    """One stored document, then a second transfer signed with the same sequence number."""
    async with connected(
        port, bundle.username, bundle.password, ((f"sohoa/v1/down/{CLONE}/#", 1),)
    ) as device:
        await device.publish(
            *encode(
                Status(
                    CLONE,
                    online=True,
                    queue_docs=0,
                    version="0.1.0",
                    disk_free_bytes=12 * 1024**3,
                    updated_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                )
            )
        )
        first = seal_document(
            device=CLONE,
            seq=7,
            signing_key=bundle.signing_key,
            central_key=central_key,
            original=b"%PDF-1.4\n% lut bao\n" + bytes(2000),
            name="Công văn lụt bão.pdf",
            text=CLONE_TEXT,
        )
        await send_and_wait_receipt(device, first)
        second = seal_document(
            device=CLONE,
            seq=7,
            signing_key=bundle.signing_key,
            central_key=central_key,
            original=b"%PDF-1.4\n% other box\n",
            name="Bản khác.pdf",
            text="khác",
        )
        await device.publish(*encode(second.messages(16 * 1024)[0]))
        await asyncio.sleep(1.0)


# Package scope: torn down when the browser tests are done, so the rest of the suite runs without
# this deployment (and its broker) in the background.
@pytest.fixture(scope="package")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    root = tmp_path_factory.mktemp("browser")
    broker_port, http_port = free_port(), free_port()
    central_home = root / "central"
    central_commands.init(
        central_home,
        broker_url=f"mqtt://127.0.0.1:{broker_port}",
        http=f"127.0.0.1:{http_port}",
        device_url=f"mqtt://127.0.0.1:{free_port()}",
    )
    central_commands.user_add(central_home, "vanhanh", "operator", PASSWORD)
    central_commands.user_add(central_home, "xem", "viewer", PASSWORD)
    bundles = {}
    for device in (LIVE, STOPPED, NEVER, REVOKED, CLONE):
        central_commands.enroll(central_home, device, root / f"{device}.toml")
        bundles[device] = read_bundle(root / f"{device}.toml")
    edge_cli.init(root / "edge", root / f"{LIVE}.toml", root / "scans")
    sample = generate_samples(root / "samples", pages=1, seed=3)[0]
    scan_name = "Quyết định sáp nhập thôn.pdf" if sample.path.suffix == ".pdf" else sample.path.name
    scan_sha256 = hashlib.sha256(sample.path.read_bytes()).hexdigest()

    with running_broker(central_home / "mosquitto.conf", broker_port, root / "broker.log") as broker:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="browser-scene", daemon=True)
        thread.start()

        def run(coro: Any, timeout: float = 60) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

        ready = asyncio.Event()
        central_task = asyncio.run_coroutine_threadsafe(
            central_worker.serve(central_home, ready=ready), loop
        )
        run(asyncio.wait_for(ready.wait(), 30))
        cfg = edge_config.load(root / "edge")
        import dataclasses  # noqa: PLC0415

        cfg = dataclasses.replace(
            cfg,
            intake=dataclasses.replace(
                cfg.intake,
                quiet_seconds=0.5,
                check_interval=0.2,
                rescan_seconds=2.0,
                unknown_quiet_seconds=1.0,
            ),
            retention=dataclasses.replace(cfg.retention, release_after_seconds=0.0),
            status_page=dataclasses.replace(cfg.status_page, listen="127.0.0.1:0"),
        )

        async def start_edge() -> EdgeService:
            service = EdgeService(cfg, ocr_engine=FakeOcrEngine(OCR_TEXT))
            asyncio.get_running_loop().create_task(service.run(), name="edge")
            await asyncio.wait_for(service.ready.wait(), 30)
            return service

        service = run(start_edge())
        shutil.copyfile(sample.path, cfg.watch_dir / f".{scan_name}.part")
        (cfg.watch_dir / f".{scan_name}.part").rename(cfg.watch_dir / scan_name)
        (cfg.watch_dir / REFUSED_NAME).write_text("Biên bản họp thôn (bản nháp, không phải bản quét)\n")

        async def counts() -> dict[str, int]:
            return dict((await service.outbox.stats()).counts)

        _wait(
            lambda: run(counts()).get("delivered", 0) >= 1 and run(counts()).get("failed", 0) >= 1,
            "the live box did not deliver its scan and refuse the text file",
        )
        device_port = broker.device_port
        central_key = central_commands.load_keys(CentralPaths(central_home)).encryption.public_key
        run(_clone(device_port, bundles[CLONE], central_key))
        run(
            _speak(
                device_port,
                bundles[STOPPED],
                Status(
                    STOPPED,
                    online=True,
                    queue_docs=3,
                    queue_bytes=4_500_000,
                    oldest_age_s=7200.0,
                    failed_docs=1,
                    version="0.1.0",
                    disk_free_bytes=3 * 1024**3,
                    updated_at="2026-01-01T00:00:00+00:00",
                ),
            )
        )
        # Its last will, as the broker publishes it when the box vanishes.
        run(_speak(device_port, bundles[STOPPED], Status(STOPPED, online=False)))
        run(_speak(device_port, bundles[REVOKED], Status(REVOKED, online=True, version="0.1.0")))
        central_commands.revoke(central_home, REVOKED)
        _wait(lambda: service.status_page_port is not None, "the clerk's page did not start")
        yield Scene(
            url=f"http://127.0.0.1:{http_port}",
            clerk_url=f"http://127.0.0.1:{service.status_page_port}",
            central_home=central_home,
            edge_home=root / "edge",
            scan_name=scan_name,
            scan_sha256=scan_sha256,
            loop=loop,
            service=service,
        )

        async def stop() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.5)

        with contextlib.suppress(Exception):
            run(stop(), timeout=30)
        central_task.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# Module scope: Playwright's sync API keeps an event loop running on the main thread while it is
# open, which the asyncio tests after the browser tests must not inherit.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (firmware-scripts/install-packages.sh dev)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
