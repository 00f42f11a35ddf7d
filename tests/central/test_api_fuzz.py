"""Fuzz the JSON API against its OpenAPI description (central/http/openapi.json) with schemathesis.

Valid and invalid parameters, paths and bodies for every operation, against the real aiohttp app on a
real catalog (two communes sharing one circular, a possible clone, an audit trail): no answer is a
5xx, and every answer conforms to the description (status, content type, JSON schema). Invalid input
must be refused with a 4xx. The two reports of issue 7 item 7 are pinned as plain examples too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from central import catalog
from central.admin import commands
from central.config import load_config
from central.http.app import create_app
from central.ingest import Ingestor
from central.keys import load_keys
from tests.central.builders import seal_document, wire
from tests.central.conftest import read_bundle
from tests.support.broker import free_port

SPEC = Path(__file__).resolve().parents[2] / "central" / "http" / "openapi.json"
EXAMPLES = 25      # per operation and generation mode: the whole file takes ~30-40 s on 2 busy cores

schema = schemathesis.openapi.from_path(SPEC)
# Credentials are sent with every call (a missing or wrong token is tested in test_auth.py), and
# unknown query parameters are pinned below: left to the generator, an extra parameter that the
# HTTP client then drops (an empty name, an empty list) or a dropped Authorization header would be
# counted as "invalid data accepted".
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES, deterministic=True, with_security_parameters=False,
                                allow_extra_parameters=False)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


@dataclass(frozen=True, slots=True)
class Api:
    url: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _seed(home: Path, tmp: Path) -> None:
    """Two communes sending one circular, another document, and a box flagged as a possible clone."""
    keys = load_keys(load_config(home).paths)
    bundles = {}
    for device in ("xa-tan-trao", "xa-minh-thanh"):
        commands.enroll(home, device, tmp / f"{device}.toml")
        bundles[device] = read_bundle(tmp / f"{device}.toml")
    conn = catalog.connect(load_config(home).paths.catalog)
    try:
        ingestor = Ingestor(conn, load_config(home).paths, keys, max_plaintext=1 << 30)
        circular = "%PDF-1.4\nCông văn 15/UBND về phòng chống lụt bão\n%%EOF\n".encode()
        for device, seq, original, name in (("xa-tan-trao", 1, circular, "Công văn 15 – Tân Trào.pdf"),
                                            ("xa-minh-thanh", 1, circular, "Công văn 15 – Minh Thanh.pdf"),
                                            ("xa-tan-trao", 2, circular + b"2", "Quyết định 7.pdf")):
            sealed = seal_document(device=device, seq=seq, signing_key=bundles[device].signing_key,
                                   central_key=keys.encryption.public_key, original=original, name=name)
            ingestor.handle_batch(wire(sealed.messages()))
        catalog.record_seq_collision(conn, device="xa-minh-thanh", seq=1, tid="c" * 32, other_tid="d" * 32,
                                     at=catalog.utc_now())
        conn.commit()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api-fuzz")
    home = tmp / "central"
    http_port = free_port()
    commands.init(home, broker_url=f"mqtt://127.0.0.1:{free_port()}", http=f"127.0.0.1:{http_port}",
                  device_url=f"mqtt://127.0.0.1:{free_port()}")
    _seed(home, tmp)
    config = load_config(home)
    # The app runs on its own loop in a thread: schemathesis calls it synchronously (requests).
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(config, ingest=False), access_log=None)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", http_port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="api-fuzz-server", daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield Api(f"http://127.0.0.1:{http_port}", config.api_token)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_answers_5xx(case: schemathesis.Case, api: Api) -> None:
    case.call_and_validate(base_url=api.url, headers=api.auth, checks=CHECKS)


@pytest.mark.parametrize(("path", "needle"), [
    ("/api/documents/99999999999999999999", "document id"),      # past SQLite's 64-bit integers
    ("/api/documents/9223372036854775808/original", "document id"),
    ("/api/documents/0", "document id"),
    ("/api/documents/%C2%B2", "document id"),                     # '²': str.isdigit says yes
    ("/api/documents/-1", "document id"),
    ("/api/documents?limit=%C2%B2", "limit"),
    ("/api/documents?limit=5001", "limit"),
    ("/api/documents?offset=%D9%A3", "offset"),                   # Arabic-Indic three
    ("/api/documents?device=X%C3%A3", "device"),
    ("/api/documents?q=" + "a" * 501, "q"),
    ("/api/devices?sort=", "sort"),
    ("/api/devices?order=sideways", "order"),
    ("/api/audit?limit=1e3", "limit"),
    ("/api/devices/Xã Tân Trào/revoke", "device id"),
    ("/api/documents?devcie=xa-tan-trao", "unknown query parameter"),     # a typo no longer lists all
    ("/api/documents?limit=1&limit=2", "more than once"),
    ("/api/fleet?x=1", "unknown query parameter"),
])
def test_bad_parameters_are_a_400_with_a_message(api: Api, path: str, needle: str) -> None:
    method = requests.post if path.endswith("/revoke") else requests.get
    response = method(api.url + path, headers=api.auth, timeout=10)
    assert response.status_code == 400, (path, response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    assert needle in response.json()["error"]


@pytest.mark.parametrize("body", ['{"name": "\\ud800", "password": "x"}',
                                  '{"name": "an", "password": "\\udfff"}',
                                  '{"name": {"a": 1}, "password": 1}', "[1]", '"an"', "{"])
def test_malformed_logins_are_a_400(api: Api, body: str) -> None:
    # A lone surrogate escaped in JSON reached the password hash and answered 500.
    response = requests.post(api.url + "/login", data=body, headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "malformed login"


RAW_ROUTES = ("/api/documents/{}", "/api/documents/{}/original", "/api/documents?limit={}",
              "/api/documents?offset={}", "/api/documents?device={}", "/api/documents?q={}",
              "/api/devices?sort={}", "/api/devices?q={}", "/api/devices?limit={}", "/api/audit?limit={}",
              "/api/devices/{}/revoke", "/api/devices/{}/clear-clone", "/api/documents?{}=1")


@given(route=st.sampled_from(RAW_ROUTES), raw=st.binary(min_size=1, max_size=40))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_bytes_in_any_parameter_never_give_a_5xx(api: Api, route: str, raw: bytes) -> None:
    # Every byte percent-encoded: invalid UTF-8, lone surrogates (ED A0 80), NUL, '²', '/', huge numbers.
    value = "".join(f"%{b:02X}" for b in raw)
    path = route.format(value)
    method = requests.post if path.endswith(("/revoke", "/clear-clone")) else requests.get
    response = method(api.url + path, headers=api.auth, timeout=10)
    assert response.status_code < 500, (path, response.status_code, response.text[:300])
    assert response.headers["Content-Type"].split(";")[0] in ("application/json", "application/pdf"), path


def test_router_errors_are_json_too(api: Api) -> None:
    missing = requests.get(api.url + "/api/khong-co", headers=api.auth, timeout=10)
    wrong_method = requests.delete(api.url + "/api/documents", headers=api.auth, timeout=10)
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    assert missing.json()["error"] and wrong_method.json()["error"]
    assert "GET" in wrong_method.headers["Allow"]


def test_same_content_and_possible_clone_are_visible(api: Api) -> None:
    docs = requests.get(api.url + "/api/documents", params={"device": "xa-minh-thanh"}, headers=api.auth,
                        timeout=10).json()
    (mine,) = docs
    detail = requests.get(f"{api.url}/api/documents/{mine['id']}", headers=api.auth, timeout=10).json()
    (other,) = detail["same_content"]
    theirs = requests.get(f"{api.url}/api/documents/{other}", headers=api.auth, timeout=10).json()
    assert (mine["device"], theirs["device"]) == ("xa-minh-thanh", "xa-tan-trao")
    assert mine["filename"] == "Công văn 15 – Minh Thanh.pdf" and theirs["sha256"] == mine["sha256"]
    devices = requests.get(api.url + "/api/devices", params={"sort": "problems"}, headers=api.auth,
                           timeout=10).json()
    assert devices[0]["id"] == "xa-minh-thanh" and devices[0]["problem"] == "possible clone"
    fleet = requests.get(api.url + "/api/fleet", headers=api.auth, timeout=10).json()
    assert fleet["devices"]["possible_clone"] == 1
    assert (fleet["documents"]["total"], fleet["documents"]["objects"]) == (3, 2)
