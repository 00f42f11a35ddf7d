"""The document's archival metadata over HTTP: extracted values with their confidence, operator
corrections (validated, CSRF-protected, kept with who and when, extracted value in the history, a
fixity event each), the archival copy's state and download, and the "văn bản" export (CSV with BOM,
XLSX) with the template's versioned columns. Real SQLite, real ingest, the real aiohttp app."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from central import catalog
from central.admin import commands
from central.catalog.db import Database
from central.config import CentralConfig
from central.http.app import create_app
from central.keys import CentralKeys
from central.records.archive_jobs import ArchiveWorker
from protocol.schemas import TEMPLATES
from tests.central.conftest import Enroll
from tests.central.records_builders import FIELDS, Ingested, ingest, scanner_pdf

PASSWORD = "mật khẩu dài đủ 12"
Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
def docs(config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, tmp_path: Path) -> list[Ingested]:
    scanner_pdf(tmp_path / "scan.pdf", 1)
    tan_trao, minh_thanh = enroll("xa-tan-trao"), enroll("xa-minh-thanh")
    return [
        ingest(config, central_keys, tan_trao, seq=1, original=(tmp_path / "scan.pdf").read_bytes(), pages=1,
               text="QUYẾT ĐỊNH Về việc phê duyệt kế hoạch số hóa"),
        ingest(config, central_keys, minh_thanh, seq=1, original=b"%PDF-1.4\n=1+2\n%%EOF\n", pages=1,
               name="Công văn 48.pdf", text="Công văn về phòng chống lụt bão",
               fields={"so_ky_hieu": ("48-CV/ĐU", 0.95), "trich_yeu": ("=HYPERLINK(\"x\")", 0.5)}),
    ]


@pytest.fixture
async def client(config: CentralConfig, docs: list[Ingested], aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(config, ingest=False))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(client: Client, path: str, token: str, status: int = 200) -> Any:
    response = await client.get(path, headers=bearer(token))
    assert response.status == status, await response.text()
    return await response.json()


async def test_metadata_fields_with_confidence_and_source(config: CentralConfig, client: Client,
                                                          docs: list[Ingested]) -> None:
    doc = await get_json(client, f"/api/documents/{docs[0].document_id}", config.api_token)
    metadata = doc["metadata"]
    assert list(metadata) == ["so_ky_hieu", "ngay", "loai", "co_quan", "trich_yeu", "nguoi_ky"]
    for name, (value, confidence) in FIELDS.items():
        assert metadata[name] == {"value": value, "confidence": confidence, "source": "extracted"}
    assert metadata["nguoi_ky"] == {"value": None, "confidence": None, "source": None}
    assert doc["package_metadata"]["ocr"]["page_info"][0]["dpi"] == 100
    assert doc["archival"] == {"state": "pending", "attempts": 0}
    assert (await client.get(f"/api/documents/{docs[0].document_id}/archival",
                             headers=bearer(config.api_token))).status == 404


async def test_operator_corrects_a_field_kept_with_who_and_when(config: CentralConfig, client: Client,
                                                                docs: list[Ingested]) -> None:
    operator = commands.token_create(config.home, "van-thu", "operator")
    viewer = commands.token_create(config.home, "xem", "viewer")
    path = f"/api/documents/{docs[0].document_id}/metadata"
    # Viewers read; only operators correct.
    assert (await client.patch(path, json={"ngay": "2025-03-15"}, headers=bearer(viewer))).status == 403
    nfd = unicodedata.normalize("NFD", "Lê Thị   Mai")
    response = await client.patch(path, headers=bearer(operator),
                                  json={"ngay": "2025-03-15", "nguoi_ky": nfd, "loai": "Quyết định",
                                        "note": "đối chiếu bản giấy"})
    assert response.status == 200, await response.text()
    body = await response.json()
    # loai equals the extracted value: recorded as an operator's confirmation.
    assert body["changed"] == ["ngay", "nguoi_ky", "loai"]
    metadata = (await get_json(client, f"/api/documents/{docs[0].document_id}", viewer))["metadata"]
    assert metadata["ngay"]["value"] == "2025-03-15" and metadata["ngay"]["source"] == "corrected"
    assert metadata["ngay"]["confidence"] == 1.0 and metadata["ngay"]["corrected_by"] == "token:van-thu"
    assert metadata["nguoi_ky"]["value"] == "Lê Thị Mai"   # NFC, spaces collapsed
    assert metadata["so_ky_hieu"]["source"] == "extracted"
    # The same value again changes nothing; null clears.
    again = await client.patch(path, json={"ngay": "2025-03-15"}, headers=bearer(operator))
    assert (await again.json())["changed"] == []
    cleared = await client.patch(path, json={"co_quan": None}, headers=bearer(operator))
    assert (await cleared.json())["metadata"]["co_quan"] == {
        "value": None, "confidence": None, "source": "corrected", "corrected_by": "token:van-thu",
        "corrected_at": (await cleared.json())["metadata"]["co_quan"]["corrected_at"]}
    history = (await get_json(client, f"{path}/history", viewer))["history"]
    ngay = [h for h in history if h["field"] == "ngay"]
    assert [(h["source"], h["value"]) for h in ngay] == [("extracted", "2025-03-14"),
                                                         ("corrected", "2025-03-15")]
    assert ngay[0]["actor"] == "device:xa-tan-trao" and ngay[1]["previous"] == "2025-03-14"
    assert ngay[1]["actor"] == "token:van-thu" and ngay[1]["note"] == "đối chiếu bản giấy"
    # Every correction is a fixity event (who, which field, from, to) and an audit row.
    events = (await get_json(client, f"/api/documents/{docs[0].document_id}/events", operator))["events"]
    corrections = [e for e in events if e["event"] == "metadata_correction"]
    assert [(e["detail"]["field"], e["detail"]["from"], e["detail"]["to"]) for e in corrections] == [
        ("ngay", "2025-03-14", "2025-03-15"), ("nguoi_ky", None, "Lê Thị Mai"),
        ("loai", "Quyết định", "Quyết định"), ("co_quan", "Ủy ban nhân dân xã Tân Trào", None)]
    assert {e["actor"] for e in corrections} == {"token:van-thu"}
    assert events[0]["event"] == "ingest" and events[0]["actor"] == "device:xa-tan-trao"
    conn = catalog.connect(config.paths.catalog, readonly=True)
    audit = [r[0] for r in conn.execute("SELECT action FROM audit WHERE action = 'correct_metadata'")]
    conn.close()
    assert len(audit) == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"ngay": "2025-02-30"}, "ngay"), ({"ngay": "14/03/2025"}, "ngay"), ({"ngay": "1850-01-01"}, "ngay"),
    ({"so_ky_hieu": "125/QĐ-UBND\u0007"}, "so_ky_hieu"), ({"trich_yeu": "Về việc " * 400}, "trich_yeu"),
    ({"loai": "   "}, "loai"), ({"loai": 7}, "loai"), ({"nguoi_ky": "Lê \u202eMai"}, "nguoi_ky"),
    ({"tac_gia": "x"}, "tac_gia"), ({}, None), ([], None), ({"note": "chỉ có ghi chú"}, None),
])
async def test_corrections_are_validated(config: CentralConfig, client: Client, docs: list[Ingested],
                                         body: object, field: str | None) -> None:
    response = await client.patch(f"/api/documents/{docs[0].document_id}/metadata", json=body,
                                  headers=bearer(config.api_token))
    assert response.status == 400
    answer = await response.json()
    assert answer.get("field") == field and answer["error"]
    conn = catalog.connect(config.paths.catalog, readonly=True)
    assert conn.execute("SELECT count(*) FROM metadata_corrections").fetchone()[0] == 0
    conn.close()


async def test_session_corrections_need_the_csrf_token(config: CentralConfig, client: Client,
                                                       docs: list[Ingested]) -> None:
    commands.user_add(config.home, "lan", "operator", PASSWORD)
    login = await client.post("/login", json={"name": "lan", "password": PASSWORD})
    csrf = (await login.json())["csrf"]
    path = f"/api/documents/{docs[0].document_id}/metadata"
    assert (await client.patch(path, json={"loai": "Quyết định"})).status == 403
    wrong = {"X-CSRF-Token": "x" * 43}
    assert (await client.patch(path, json={"loai": "Công văn"}, headers=wrong)).status == 403
    done = await client.patch(path, json={"loai": "Công văn"}, headers={"X-CSRF-Token": csrf})
    assert done.status == 200 and (await done.json())["metadata"]["loai"]["corrected_by"] == "session:lan"
    form = await client.patch(path, data="loai=x", headers={
        "X-CSRF-Token": csrf, "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


async def test_export_csv_has_bom_template_columns_and_the_selection(
        config: CentralConfig, client: Client, docs: list[Ingested]) -> None:
    await client.patch(f"/api/documents/{docs[0].document_id}/metadata", json={"nguoi_ky": "Lê Thị Mai"},
                       headers=bearer(config.api_token))
    response = await client.get("/api/export", headers=bearer(config.api_token))
    assert response.status == 200 and response.content_type == "text/csv"
    assert response.headers["X-Sohoa-Template"] == "tt05-2025; version=1"
    assert "van-ban_tt05-2025-v1_" in response.headers["Content-Disposition"]
    raw = await response.read()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    rows = _csv(raw.decode("utf-8-sig"))
    template = TEMPLATES["tt05-2025"]
    header, *body = rows
    assert header[:len(template.fields)] == [f.label for f in template.fields]
    assert len(body) == 2
    by_id = {int(r[header.index("Mã văn bản (sohoa)")]): dict(zip(header, r, strict=True)) for r in body}
    first = by_id[docs[0].document_id]
    assert first["Số và ký hiệu văn bản"] == "125/QĐ-UBND"
    assert first["Ngày, tháng, năm văn bản"] == "2025-03-14"
    assert first["Họ tên người ký"] == "Lê Thị Mai" and first["Trường đã được hiệu đính"] == "nguoi_ky"
    assert first["Số lượng trang"] == "1" and first["Trường cần kiểm tra (độ tin cậy < 0,8)"] == "loai"
    assert first["Mẫu dữ liệu (phiên bản)"] == "tt05-2025 v1"
    # A formula from a scanned page is defused.
    assert by_id[docs[1].document_id]["Trích yếu nội dung"] == "'=HYPERLINK(\"x\")"
    # The selection: device, full text (folded), arrival dates (Vietnam time), another template.
    only = _csv((await (await client.get("/api/export", params={"device": "xa-minh-thanh"},
                                         headers=bearer(config.api_token))).read()).decode("utf-8-sig"))
    assert len(only) == 2 and only[1][header.index("Thiết bị (xã gửi)")] == "xa-minh-thanh"
    found = _csv((await (await client.get("/api/export", params={"q": "phong chong lut"},
                                          headers=bearer(config.api_token))).read()).decode("utf-8-sig"))
    assert [r[header.index("Thiết bị (xã gửi)")] for r in found[1:]] == ["xa-minh-thanh"]
    past = _csv((await (await client.get("/api/export", params={"from": "2020-01-01", "to": "2020-12-31"},
                                         headers=bearer(config.api_token))).read()).decode("utf-8-sig"))
    assert len(past) == 1
    older = await client.get("/api/export", params={"template": "tt02-2019"},
                             headers=bearer(config.api_token))
    assert older.headers["X-Sohoa-Template"] == "tt02-2019; version=1"
    for params in ({"format": "pdf"}, {"from": "2025-13-01"}, {"from": "2025-03-02", "to": "2025-03-01"},
                   {"template": "tt99"}, {"device": "Xã"}, {"limit": "5"}):
        refused = await client.get("/api/export", params=params, headers=bearer(config.api_token))
        assert refused.status == 400, params


def _xlsx_rows(data: bytes) -> tuple[list[list[str]], dict[str, str]]:
    """Cell text per row of the first sheet, and the custom properties (no spreadsheet library needed)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        sheet = ElementTree.fromstring(book.read("xl/worksheets/sheet1.xml"))
        custom = book.read("docProps/custom.xml").decode()
    rows = []
    for row in sheet.iter(f"{{{ns['m']}}}row"):
        cells = []
        for cell in row:
            text = "".join(t.text or "" for t in cell.iter(f"{{{ns['m']}}}t"))
            value = cell.find("m:v", ns)
            cells.append(text or (value.text if value is not None and value.text else ""))
        rows.append(cells)
    props = dict(re.findall(r'name="([^"]+)"[^>]*>\s*<vt:\w+>([^<]*)<', custom))
    return rows, props


async def test_export_xlsx(config: CentralConfig, client: Client, docs: list[Ingested]) -> None:
    response = await client.get("/api/export", params={"format": "xlsx", "device": "xa-minh-thanh"},
                                headers=bearer(config.api_token))
    assert response.status == 200
    assert response.content_type == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    rows, props = _xlsx_rows(await response.read())
    assert props == {"sohoa_template": "tt05-2025", "sohoa_template_version": "1"}
    header, row = rows
    assert header[:3] == [f.label for f in TEMPLATES["tt05-2025"].fields][:3]
    assert "48-CV/ĐU" in row and "=HYPERLINK(\"x\")" in row   # a string cell, never a formula
    assert list((config.home / "export-tmp").iterdir()) == []
    conn = catalog.connect(config.paths.catalog, readonly=True)
    [detail] = [json.loads(r[0])
                for r in conn.execute("SELECT detail FROM audit WHERE action = 'export_metadata'")]
    conn.close()
    assert detail == {"format": "xlsx", "template": "tt05-2025 v1", "device": "xa-minh-thanh"}


async def test_archival_copy_download_is_audited_and_an_event(
        config: CentralConfig, client: Client, docs: list[Ingested]) -> None:
    db = Database(config.paths.catalog, readonly=False, name="test-archive")
    try:
        worker = ArchiveWorker(config.paths, db)
        await worker.start()
        job = await db.call(worker._next)
        assert job is not None
        await worker.process(job)
    finally:
        await db.close()
    doc_id = docs[0].document_id
    viewer = commands.token_create(config.home, "xem", "viewer")
    operator = commands.token_create(config.home, "van-thu", "operator")
    archival = (await get_json(client, f"/api/documents/{doc_id}", viewer))["archival"]
    assert archival["state"] == "done" and archival["profile"] == "PDF/A-2b, PAdES B-B"
    path = f"/api/documents/{doc_id}/archival"
    assert (await client.get(path, headers=bearer(viewer))).status == 403
    response = await client.get(path, headers=bearer(operator))
    assert response.status == 200 and response.content_type == "application/pdf"
    data = await response.read()
    assert data.startswith(b"%PDF-") and response.headers["X-Content-SHA256"] == archival["sha256"]
    assert "filename*=UTF-8''Quy%E1%BA%BFt" in response.headers["Content-Disposition"]
    original = await client.get(f"/api/documents/{doc_id}/original", headers=bearer(operator))
    assert original.status == 200
    events = (await get_json(client, f"/api/documents/{doc_id}/events", operator))["events"]
    downloads = [(e["detail"]["kind"], e["object_sha256"], e["actor"])
                 for e in events if e["event"] == "download"]
    assert downloads == [("archival", archival["sha256"], "token:van-thu"),
                         ("original", docs[0].sha256, "token:van-thu")]
    assert [e["event"] for e in events][:2] == ["ingest", "archival_copy"]
