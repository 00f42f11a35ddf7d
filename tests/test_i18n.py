"""The string tables: every language has every key, with the same placeholders, and every key the
code uses exists (Vietnamese is the default; a missing key would show its name to a clerk)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"central": ROOT / "central" / "http" / "static" / "i18n", "edge": ROOT / "edge" / "i18n"}
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@pytest.mark.parametrize("side", sorted(TABLES))
def test_tables_match(side: str) -> None:
    vi = json.loads((TABLES[side] / "vi.json").read_text(encoding="utf-8"))
    en = json.loads((TABLES[side] / "en.json").read_text(encoding="utf-8"))
    assert vi.keys() == en.keys()
    for key in vi:
        assert set(PLACEHOLDER.findall(vi[key])) == set(PLACEHOLDER.findall(en[key])), key
        assert vi[key].strip() and en[key].strip(), key


def test_every_key_the_code_uses_exists() -> None:
    central = json.loads((TABLES["central"] / "vi.json").read_text(encoding="utf-8"))
    script = (ROOT / "central" / "http" / "static" / "app.js").read_text(encoding="utf-8")
    pages = "".join((ROOT / "central" / "http" / "static" / name).read_text(encoding="utf-8")
                    for name in ("dashboard.html", "login.html"))
    # Whole keys only: a prefix followed by `+` (t("problem_" + d.problem)) is checked below.
    used = set(re.findall(r'\bt\("([a-z_]+)"[,)]', script))
    used |= set(re.findall(r'data-i18n="([a-z_]+)"', pages))
    assert used - central.keys() == set()
    # Keys built from data: a device's problem, state, role, a fixity event.
    for key in ("problem_possible clone", "problem_offline with backlog", "problem_error",
                "problem_stale backlog", "problem_offline", "role_viewer", "role_operator", "role_admin",
                "event_ingest", "event_notice", "event_notice_mismatch",
                "event_duplicate", "event_repaired", "event_rejected", "event_possible_clone", "state_online",
                "state_offline", "state_never", "state_revoked"):
        assert key in central, key
    # Every fixity event central records, every record field and archival state the page shows.
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "central").glob("*.py"))
    for event in set(re.findall(r'event="([a-z_]+)"', sources)) | {"ingest"}:
        assert f"event_{event}" in central, event
    from protocol.bag import DOCUMENT_FIELDS  # noqa: PLC0415
    for name in DOCUMENT_FIELDS:
        assert f"af_{name}" in central, name
    for state in ("pending", "running", "failed", "done"):
        assert f"archival_{state}" in central, state
    edge = json.loads((TABLES["edge"] / "vi.json").read_text(encoding="utf-8"))
    code = "".join((ROOT / "edge" / name).read_text(encoding="utf-8") for name in ("statuspage.py", "cli.py"))
    used = set(re.findall(r'\btr\(["\']([a-z_]+)["\'][,)]', code))
    assert used - edge.keys() == set()
    for stage in ("received", "ocr", "sending", "archived", "refused"):
        assert f"stage_{stage}" in edge
    for key in ("step_received", "step_ocr", "step_sent", "step_archived", "state_stable", "state_packaged",
                "state_sending", "state_delivered", "state_failed"):
        assert key in edge, key


def test_every_alarm_reads_in_the_clerks_language() -> None:
    """A clerk's page in Vietnamese shows no English alarm: each fixed alarm has its text, and the
    worded ones (a figure, an OS error) are matched by how edge.service starts them."""
    from edge import alarms  # noqa: PLC0415
    from edge.clerk import alarm_text  # noqa: PLC0415

    fixed = [v for k, v in vars(alarms).items() if k.isupper() and isinstance(v, str)]
    worded = ["oldest document waiting 80 h (alarm after 72 h)", "cannot take scans: Permission denied"]
    for alarm in [*fixed, *worded]:
        for lang in ("vi", "en"):
            assert alarm_text(lang, alarm) != alarm, (lang, alarm)
    service = (ROOT / "edge" / "service.py").read_text(encoding="utf-8")
    assert 'raise_(f"oldest document waiting' in service and 'raise_(f"cannot take scans:' in service
