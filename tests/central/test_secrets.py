"""No secret reaches a log or an API answer: caplog, the broker log and every HTTP route, grepped."""

from __future__ import annotations

import logging
import secrets
import tomllib
from pathlib import Path

import pytest
from pytest_aiohttp.plugin import AiohttpClient

from central.admin import commands
from central.config import CentralConfig
from central.http.app import create_app
from central.keys import CentralKeys, b64
from tests.central.builders import seal_document
from tests.central.conftest import Enroll
from tests.central.test_broker import connected
from tests.central.test_service import ingest_ready, send_and_wait_receipt
from tests.support.broker import Broker

PASSWORD = "mật khẩu của Lan 2024"


async def test_no_secret_in_logs_or_api(
        config: CentralConfig, central_broker: Broker, central_keys: CentralKeys, enroll: Enroll,
        aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bundle = enroll("xa-tan-trao")
    enroll("xa-minh-thanh")
    bundle_text = (tmp_path / "xa-tan-trao.bundle.toml").read_text()
    client = await aiohttp_client(create_app(config))
    await ingest_ready(client.app)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=bundle.signing_key,
                           central_key=central_keys.encryption.public_key,
                           original=b"%PDF-1.4\n" + secrets.token_bytes(30_000))
    async with connected(central_broker.device_port, bundle.username, bundle.password,
                         (("sohoa/v1/down/xa-tan-trao/#", 1),)) as device:
        await send_and_wait_receipt(device, sealed)
    commands.user_add(config.home, "lan", "admin", PASSWORD)
    token = commands.token_create(config.home, "bao-cao", "admin")
    login = await client.post("/login", json={"name": "lan", "password": PASSWORD})
    session_cookie = login.cookies["sohoa_session"].value
    csrf = (await login.json())["csrf"]
    await client.post("/login", json={"name": "lan", "password": "sai " + PASSWORD})   # audited, not logged
    commands.revoke(config.home, "xa-minh-thanh")

    answers = []
    for path in ("/api/devices", "/api/documents", "/api/documents/1", "/api/session", "/api/audit",
                 "/metrics", "/healthz"):
        response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200, path
        answers.append(await response.text())
    await client.post("/logout", headers={"X-CSRF-Token": csrf})

    secrets_to_find = {
        "central broker password": config.broker.password,
        "device broker password": bundle.password,
        "device signing seed": tomllib.loads(bundle_text)["device"]["signing_key"],
        "central encryption key": b64(bytes(central_keys.encryption)),
        "central receipt key": b64(bytes(central_keys.receipt)),
        "bootstrap api token": config.api_token,
        "api token": token,
        "operator password": PASSWORD,
        "session id": session_cookie,
        "csrf token": csrf,
    }
    broker_log = (config.paths.broker_dir / "mosquitto.log").read_text(errors="replace")
    places = {"central log (caplog)": caplog.text, "broker log": broker_log,
              "HTTP answers": "\n".join(answers)}
    hits = [(what, where) for what, secret in secrets_to_find.items() for where, text in places.items()
            if secret in text]
    print(f"grepped {len(secrets_to_find)} secrets in {sum(map(len, places.values()))} characters of logs "
          f"and answers: {len(hits)} hits")
    assert "xa-tan-trao" in caplog.text and "xa-tan-trao" in broker_log   # the logs are not empty
    assert hits == []
