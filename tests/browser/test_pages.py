"""The dashboard and the clerk's page in headless Chromium (Debian's, through Playwright), as people use them.

Each test records console errors and fails on any; each page is checked with axe-core (0 serious or
critical violations) and at 390 px for horizontal scroll; screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import (
    AXE,
    CLONE,
    CLONE_TEXT,
    LIVE,
    NEVER,
    PASSWORD,
    REFUSED_NAME,
    REVOKED,
    STOPPED,
    Scene,
    shot,
)

pytestmark = pytest.mark.timeout(120)
STATES = {
    "vi": {
        LIVE: "Trực tuyến",
        STOPPED: "Mất kết nối",
        NEVER: "Chưa từng kết nối",
        REVOKED: "Đã thu hồi",
        CLONE: "Trực tuyến",
    },
    "en": {LIVE: "Online", STOPPED: "Offline", NEVER: "Never connected", REVOKED: "Revoked", CLONE: "Online"},
}


class Page:
    """A browser page that remembers console errors."""

    def __init__(self, context: Any) -> None:
        # axe-core arrives as an init script (CDP), which the pages' CSP rightly does not allow inline.
        context.add_init_script(path=str(AXE))
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def axe(self) -> list[dict[str, Any]]:
        result = self.page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        return [v for v in result["violations"] if v["impact"] in ("serious", "critical")]

    def no_horizontal_scroll(self) -> None:
        widths = self.page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"the page scrolls sideways: {widths[0]} px > {widths[1]} px"


@pytest.fixture
def context(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    lang = getattr(request, "param", "vi")
    ctx = browser.new_context(
        viewport={"width": 1280, "height": 900},
        accept_downloads=True,
        locale="vi-VN" if lang == "vi" else "en-GB",
        timezone_id="Europe/Paris",
    )
    if lang == "en":  # the reader's choice is kept in the browser, as the switch button does
        ctx.add_init_script("localStorage.setItem('sohoa.lang', 'en')")
    try:
        yield ctx
    finally:
        ctx.close()


def login(scene: Scene, context: Any, name: str = "vanhanh") -> Page:
    p = Page(context)
    p.page.goto(scene.url + "/")
    p.page.fill("#name", name)
    p.page.fill("#password", PASSWORD)
    p.page.click("form#login button")
    p.page.wait_for_selector("#devices tbody tr")
    return p


def check(p: Page, name: str) -> None:
    """axe-core, 390 px, console: the rules every page is held to."""
    serious = p.axe()
    assert serious == [], json.dumps(
        [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]) for v in serious], ensure_ascii=False
    )
    shot(p.page, name)
    p.page.set_viewport_size({"width": 390, "height": 844})
    p.page.wait_for_timeout(150)
    p.no_horizontal_scroll()
    shot(p.page, name + "-390px")
    p.page.set_viewport_size({"width": 1280, "height": 900})
    assert p.errors == []


@pytest.mark.parametrize("context", ["vi", "en"], indirect=True)
def test_fleet_states_and_search(scene: Scene, context: Any, request: pytest.FixtureRequest) -> None:
    lang = request.node.callspec.params["context"]
    p = login(scene, context)
    page = p.page
    assert page.evaluate("document.documentElement.lang") == lang
    for device, state in STATES[lang].items():
        row = page.locator("#devices tbody tr", has=page.locator(f"a[href='/devices/{device}']"))
        assert row.locator("[data-state]").inner_text() == state, device
    clone_row = page.locator("#devices tbody tr", has=page.locator(f"a[href='/devices/{CLONE}']"))
    assert clone_row.locator(".badge.clone").count() == 1
    # Times are Vietnam time whatever the browser's zone (this one is set to Paris).
    assert page.locator("footer").inner_text() == (
        "Mọi thời gian theo giờ Việt Nam (UTC+7)." if lang == "vi" else "All times are Vietnam time (UTC+7)."
    )
    check(p, f"fleet-{lang}")

    # With and without diacritics: the same document, the match highlighted in the snippet.
    for query in ("lụt bão", "lut bao"):
        page.fill("#q", query)
        page.click("#search-submit")
        page.wait_for_selector("#documents li[data-id] .snippet mark")
        results = page.locator("#documents li[data-id]")
        assert results.count() == 1
        marks = [m.lower() for m in results.first.locator(".snippet mark").all_inner_texts()]
        assert marks == ["lụt", "bão"], marks
        assert CLONE_TEXT.split(",")[0] in results.first.locator(".snippet").inner_text()
    page.fill("#q", "quyet dinh sap nhap")
    page.click("#search-submit")
    page.locator("#documents li[data-id] a.title", has_text="Quyết định").first.wait_for()
    assert page.locator("#doc-order").inner_text() == (
        "Kết quả theo mức độ phù hợp" if lang == "vi" else "Results by relevance"
    )
    shot(page, f"search-{lang}")
    assert p.errors == []


def test_document_page_download_matches_sha256(scene: Scene, context: Any, tmp_path: Path) -> None:
    p = login(scene, context)
    page = p.page
    page.fill("#q", "Khuôn Điển")
    page.click("#search-submit")
    page.wait_for_selector("#documents li[data-id] a.title")
    page.locator("#documents li[data-id] a.title").first.click()
    page.wait_for_selector("#ocr-text")
    assert page.locator("h1").inner_text() == scene.scan_name
    assert "Khuôn Điển" in page.locator("#ocr-text").inner_text()
    assert page.locator("#sha256").inner_text() == scene.scan_sha256
    assert "null" not in page.locator("main").inner_text() and "undefined" not in page.locator("main").inner_text()
    # (wait_for_function evaluates a string, which the page's CSP forbids: poll from here instead)
    for _ in range(100):
        if page.evaluate(
            "() => { const i = document.querySelector('img#preview');"
            " return !!i && i.complete && i.naturalWidth > 100; }"
        ):
            break
        page.wait_for_timeout(100)
    else:
        raise AssertionError("the preview image did not load")
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "original"
    info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == scene.scan_sha256
    assert info.value.suggested_filename == scene.scan_name
    check(p, "document-vi")


def test_viewer_sees_no_download(scene: Scene, context: Any) -> None:
    p = login(scene, context, name="xem")
    page = p.page
    page.locator("#documents li[data-id] a.title", has_text=scene.scan_name).click()
    page.wait_for_selector("#no-download")
    assert page.locator("#download").count() == 0
    assert page.locator("#no-download").inner_text() == "Tải bản gốc cần quyền người vận hành."
    shot(page, "document-viewer-vi")
    response = page.request.get(
        scene.url + page.url.replace(scene.url, "").replace("/documents/", "/api/documents/") + "/original"
    )
    assert response.status == 403
    assert p.errors == []


@pytest.mark.parametrize("context", ["vi", "en"], indirect=True)
def test_device_pages(scene: Scene, context: Any, request: pytest.FixtureRequest) -> None:
    lang = request.node.callspec.params["context"]
    p = login(scene, context)
    page = p.page
    page.goto(f"{scene.url}/devices/{STOPPED}")
    page.wait_for_selector("#device-state")
    assert page.locator("#device-state").inner_text() == STATES[lang][STOPPED]
    assert page.locator("#disk-free").inner_text().startswith("3")
    assert page.locator("svg.chart").count() == 1
    assert "null" not in page.locator("main").inner_text() and "undefined" not in page.locator("main").inner_text()
    check(p, f"device-stopped-{lang}")
    page.goto(f"{scene.url}/devices/{LIVE}")
    page.wait_for_selector("#device-state")
    assert page.locator("#device-state").inner_text() == STATES[lang][LIVE]
    assert page.locator("a", has_text=scene.scan_name).count() == 1
    shot(page, f"device-live-{lang}")
    assert p.errors == []


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_clerk_page_shows_the_refused_scan(scene: Scene, browser: Any, lang: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        p = Page(context)
        p.page.goto(scene.clerk_url + ("/" if lang == "vi" else "/?lang=en"))
        refused = p.page.locator("#refused li.refused")
        assert refused.count() == 1
        text = refused.first.inner_text()
        assert REFUSED_NAME in text
        if lang == "vi":
            assert "Lý do: Tệp không phải là bản quét PDF, JPEG, PNG hoặc TIFF." in text
            assert "Cách xử lý: Quét lại tài liệu và lưu dưới dạng PDF hoặc JPEG." in text
            assert p.page.locator("#facts").inner_text().count("Đã kết nối") == 1
        else:
            assert "The file is not a PDF, JPEG, PNG or TIFF scan." in text
        archived = p.page.locator("#recent tr[data-stage='archived']", has_text=scene.scan_name)
        assert archived.count() == 1
        check(p, f"clerk-{lang}")
    finally:
        context.close()
