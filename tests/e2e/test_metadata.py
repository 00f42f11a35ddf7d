"""The document's metadata travels with it: real tesseract on the edge (the engine built from config),
fields extracted from the layout, and central's API returning them with their confidences; then
central's archival worker builds the signed PDF/A-2b of the stored original, in the running service."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edge.testset import Degradation, generate
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


async def test_extracted_fields_reach_central(deployment: Deployment, tmp_path: Path) -> None:
    [(path, page)] = generate(tmp_path / "src", 1, seed=12, mix=[Degradation(dpi=200, rotate=180)])
    cfg = deployment.edge_config()
    async with running(deployment) as service:    # no engine given: build_engine(cfg.ocr)
        (cfg.watch_dir / "Quyết định.png").write_bytes(path.read_bytes())

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts.get("delivered", 0) == 1

        assert await wait_until(delivered, within=180)
        [listed] = await deployment.get_json("/api/documents")  # type: ignore[misc]
        doc = await deployment.get_json(f"/api/documents/{listed['id']}")
        assert isinstance(doc, dict)

        async def archived() -> bool:
            view = await deployment.get_json(f"/api/documents/{listed['id']}")
            assert isinstance(view, dict) and view["archival"]["state"] != "failed", view["archival"]
            return bool(view["archival"]["state"] == "done")

        assert await wait_until(archived, within=60)
        archival = await deployment.get_bytes(f"/api/documents/{listed['id']}/archival")
    metadata = doc["metadata"]
    got = {name: field["value"] for name, field in metadata.items()}
    assert got["so_ky_hieu"] == page.document.fields["so_ky_hieu"]
    assert got["ngay"] == page.document.fields["ngay"] and got["loai"] == page.document.fields["loai"]
    assert all(0 < field["confidence"] <= 1 and field["source"] == "extracted"
               for field in metadata.values() if field["value"] is not None)
    assert doc["package_metadata"]["ocr"]["page_info"][0]["rotation"] == 180
    assert "CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM" in doc["text"]
    signed = tmp_path / "archival.pdf"
    signed.write_bytes(archival)
    sig = subprocess.run(["pdfsig", str(signed)], capture_output=True, text=True, check=False)
    assert sig.returncode == 0 and "Signature is Valid" in sig.stdout, sig.stdout
