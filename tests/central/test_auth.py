"""Operators, API tokens, sessions, CSRF, login rate limiting and the download audit, over real SQLite."""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from central import catalog
from central.admin import commands
from central.admin.operators import OperatorError
from central.config import CentralConfig
from central.http.app import create_app
from central.ingest import Ingestor
from central.keys import CentralKeys
from central.storage import ObjectStore
from tests.central.builders import seal_document, wire
from tests.central.conftest import Enroll

PASSWORD = "mật khẩu dài đủ 12"
ORIGINAL = b"%PDF-1.4\n" + b"Quy\xe1\xba\xbft \xc4\x91\xe1\xbb\x8bnh" * 100
API_ROUTES = ("/api/devices", "/api/documents", "/api/documents/1", "/api/documents/1/original",
              "/api/session", "/api/audit")


def ingest_one(config: CentralConfig, keys: CentralKeys, enroll: Enroll) -> int:
    bundle = enroll("xa-tan-trao")
    conn = catalog.connect(config.paths.catalog)
    try:
        ingestor = Ingestor(conn, config.paths, keys, max_plaintext=config.ingest.max_plaintext_bytes)
        sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=bundle.signing_key,
                               central_key=keys.encryption.public_key, original=ORIGINAL)
        ingestor.handle_batch(wire(sealed.messages()))
        (doc,) = catalog.documents_with_content(conn, hashlib.sha256(ORIGINAL).hexdigest())
    finally:
        conn.close()
    return doc


@pytest.fixture
async def client(config: CentralConfig, central_keys: CentralKeys, enroll: Enroll,
                 aiohttp_client: AiohttpClient) -> TestClient:  # type: ignore[type-arg]
    ingest_one(config, central_keys, enroll)
    return await aiohttp_client(create_app(config, ingest=False))


async def test_no_credentials_get_nothing(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in API_ROUTES:
        response = await client.get(path)
        body = await response.text()
        assert response.status == 401, path
        assert "xa-tan-trao" not in body and "Công văn" not in body and "Quyết" not in body
    for path in ("/api/devices/xa-tan-trao/revoke", "/logout"):
        assert (await client.post(path)).status == 401
    page = await client.get("/")
    text = await page.text()
    assert page.status == 200 and 'id="login"' in text and "xa-tan-trao" not in text
    assert (await client.get("/api/devices", headers={"Authorization": "Basic eDp5"})).status == 401


async def test_tokens_roles_and_revocation(config: CentralConfig, client: TestClient) -> None:  # type: ignore[type-arg]
    viewer = commands.token_create(config.home, "bao-cao", "viewer")
    operator = commands.token_create(config.home, "sao-luu", "operator")
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    as_operator = {"Authorization": f"Bearer {operator}"}
    assert (await client.get("/api/documents", headers=as_viewer)).status == 200
    assert (await client.get("/api/documents/1/original", headers=as_viewer)).status == 403
    assert (await client.post("/api/devices/xa-tan-trao/revoke", headers=as_operator)).status == 403
    assert (await client.get("/api/audit", headers=as_operator)).status == 403
    response = await client.get("/api/documents/1/original", headers=as_operator)
    assert response.status == 200 and await response.read() == ORIGINAL
    # Hashed at rest: neither token appears in the catalog file.
    raw = config.paths.catalog.read_bytes() + Path(f"{config.paths.catalog}-wal").read_bytes()
    assert viewer.encode() not in raw and operator.encode() not in raw
    commands.token_revoke(config.home, "bao-cao")
    assert (await client.get("/api/documents", headers=as_viewer)).status == 401
    with pytest.raises(OperatorError):
        commands.token_revoke(config.home, "bao-cao")
    with pytest.raises(OperatorError):
        commands.token_create(config.home, "bao-cao")   # a revoked name is not reused
    bootstrap = {"Authorization": f"Bearer {config.api_token}"}
    audit = await (await client.get("/api/audit", headers=bootstrap)).json()
    downloads = [a for a in audit if a["action"] == "download_original"]
    assert [(a["actor"], a["target"]) for a in downloads] == [("token:sao-luu", "1")]
    assert "Công văn số 5 – Tuyên Quang.pdf" in downloads[0]["detail"]


async def test_session_cookie_csrf_and_audit(config: CentralConfig, client: TestClient) -> None:  # type: ignore[type-arg]
    commands.user_add(config.home, "lan", "admin", PASSWORD)
    commands.user_add(config.home, "minh", "viewer", PASSWORD)
    with pytest.raises(OperatorError):
        commands.user_add(config.home, "ngan", "viewer", "short")
    assert (await client.post("/login", data={"name": "lan", "password": PASSWORD})).status == 415
    assert (await client.post("/login", json={"name": "lan", "password": "sai"})).status == 401
    response = await client.post("/login", json={"name": "lan", "password": PASSWORD})
    assert response.status == 200
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    csrf = (await response.json())["csrf"]
    session = await (await client.get("/api/session")).json()
    assert (session["operator"], session["role"], session["csrf"]) == ("lan", "admin", csrf)
    assert (await client.get("/")).status == 200

    revoke = "/api/devices/xa-tan-trao/revoke"
    assert (await client.post(revoke)).status == 403                                    # no CSRF token
    assert (await client.post(revoke, headers={"X-CSRF-Token": "x" * 43})).status == 403
    with sqlite3.connect(config.paths.catalog) as conn:
        assert conn.execute("SELECT status FROM devices").fetchone()[0] == "active"
    done = await client.post(revoke, headers={"X-CSRF-Token": csrf})
    assert done.status == 200 and (await done.json())["status"] == "revoked"
    assert (await client.get("/api/documents/1/original")).status == 200

    assert (await client.post("/logout", headers={"X-CSRF-Token": csrf})).status == 200
    assert (await client.get("/api/session")).status == 401

    # A viewer session may browse but not download or revoke.
    await client.post("/login", json={"name": "minh", "password": PASSWORD})
    assert (await client.get("/api/documents")).status == 200
    assert (await client.get("/api/documents/1/original")).status == 403

    with sqlite3.connect(config.paths.catalog) as conn:
        rows = conn.execute("SELECT actor, action, target FROM audit ORDER BY id").fetchall()
        hashes = [bytes(r[0]) for r in conn.execute("SELECT pwhash FROM operators")]
    assert ("session:lan", "revoke_device", "xa-tan-trao") in rows
    assert ("session:lan", "download_original", "1") in rows
    assert any(action == "login_failed" and target == "lan" for _, action, target in rows)
    assert all(h.startswith(b"$argon2id$") for h in hashes)


async def test_login_rate_limit_and_no_password_in_logs(config: CentralConfig, client: TestClient,  # type: ignore[type-arg]
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    commands.user_add(config.home, "lan", "operator", PASSWORD)
    wrong = [secrets.token_urlsafe(12) for _ in range(5)]
    for guess in wrong:
        assert (await client.post("/login", json={"name": "lan", "password": guess})).status == 401
    blocked = await client.post("/login", json={"name": "lan", "password": PASSWORD})
    assert blocked.status == 429 and int(blocked.headers["Retry-After"]) > 0
    # Another name from the same address is blocked too (per-address limit).
    assert (await client.post("/login", json={"name": "minh", "password": PASSWORD})).status == 429
    with sqlite3.connect(config.paths.catalog) as conn:
        audit = "\n".join(str(r) for r in conn.execute("SELECT * FROM audit"))
    for secret in [PASSWORD, *wrong]:
        assert secret not in caplog.text and secret not in audit


async def test_an_original_rotten_on_disk_is_not_served_under_its_hash(config: CentralConfig,
                                                                        client: TestClient) -> None:  # type: ignore[type-arg]
    """One flipped byte in the object store: the download is refused (500) instead of serving other
    bytes with ``X-Content-SHA256`` naming the signed hash, and it is a failed fixity event."""
    bootstrap = {"Authorization": f"Bearer {config.api_token}"}
    sha = hashlib.sha256(ORIGINAL).hexdigest()
    path = ObjectStore(config.paths.objects).path_for(sha)
    path.chmod(0o600)
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0x01
    path.write_bytes(bytes(rotten))
    response = await client.get("/api/documents/1/original", headers=bootstrap)
    assert response.status == 500 and "not served" in (await response.json())["error"]
    conn = sqlite3.connect(config.paths.catalog)
    (outcome, detail), = conn.execute(
        "SELECT outcome, detail FROM fixity WHERE event = 'download'").fetchall()
    conn.close()
    assert outcome == "failure" and hashlib.sha256(bytes(rotten)).hexdigest() in detail
