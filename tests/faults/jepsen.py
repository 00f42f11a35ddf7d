"""Judge a fault run the way Jepsen judges a history: every document dropped into a scan folder must end
up in central's catalog exactly once — not lost, not stored twice — and every SQLite file must be intact.

Catalog rows flagged ``duplicate`` are central recognising a re-sent document (idempotence working), so
they never count as extra copies; an unflagged second row for the same content is a real duplicate.
Rows whose content nobody dropped are reported as unexpected: the store holds something it should not.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SQLITE_SUFFIXES = frozenset({".db", ".sqlite", ".sqlite3"})


class Outcome(StrEnum):
    OK = "ok"
    LOST = "lost"
    DUPLICATED = "duplicated"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One row of central's catalog as the checker needs it."""

    sha256: str
    device: str
    tid: str
    duplicate: bool

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happened to one dropped document."""

    name: str
    sha256: str
    outcome: Outcome
    copies: int  # unflagged catalog rows holding this content
    tids: tuple[str, ...]  # every transfer that carried it, flagged duplicates included


@dataclass(frozen=True, slots=True)
class Summary:
    dropped: int
    ok: int
    lost: int
    duplicated: int
    unexpected: int

    @property
    def valid(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0


@dataclass(frozen=True, slots=True)
class Report:
    verdicts: tuple[Verdict, ...]
    unexpected: tuple[CatalogEntry, ...]
    summary: Summary

    def with_outcome(self, outcome: Outcome) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.outcome is outcome)

    def describe(self) -> str:
        s = self.summary
        lines = [f"{s.dropped} dropped: {s.ok} ok, {s.lost} lost, {s.duplicated} duplicated, "
                 f"{s.unexpected} unexpected in the catalog"]
        lines += [f"  {v.outcome.value}: {v.name} ({v.sha256[:12]}…, {v.copies} copies, tids {list(v.tids)})"
                  for v in self.verdicts if v.outcome is not Outcome.OK]
        lines += [f"  unexpected: {e.sha256[:12]}… from {e.device} tid {e.tid}" for e in self.unexpected]
        return "\n".join(lines)


def classify(
    dropped: Mapping[str, str],
    catalog: Iterable[CatalogEntry | tuple[str, str, str, bool]],
    *,
    device: str | None = None,
) -> Report:
    """Classify each dropped document (name → sha256) against central's catalog rows.

    Several names with the same content may legitimately be stored once each, so content dropped
    under k names is ok with 1..k unflagged rows and duplicated beyond k. ``device`` restricts the
    catalog to one edge's rows when several edges share a central.
    """
    entries = [e if isinstance(e, CatalogEntry) else CatalogEntry(*e) for e in catalog]
    if device is not None:
        entries = [e for e in entries if e.device == device]
    copies = Counter(e.sha256 for e in entries if not e.duplicate)
    tids: defaultdict[str, list[str]] = defaultdict(list)
    for entry in entries:
        tids[entry.sha256].append(entry.tid)
    names_per_content = Counter(sha.lower() for sha in dropped.values())

    verdicts = []
    for name, given in sorted(dropped.items()):
        sha = given.lower()
        count = copies[sha]
        if count == 0:
            outcome = Outcome.LOST
        elif count > names_per_content[sha]:
            outcome = Outcome.DUPLICATED
        else:
            outcome = Outcome.OK
        verdicts.append(Verdict(name, sha, outcome, count, tuple(sorted(tids[sha]))))
    unexpected = tuple(e for e in entries if e.sha256 not in names_per_content)
    by_outcome = Counter(v.outcome for v in verdicts)
    summary = Summary(
        dropped=len(verdicts),
        ok=by_outcome[Outcome.OK],
        lost=by_outcome[Outcome.LOST],
        duplicated=by_outcome[Outcome.DUPLICATED],
        unexpected=len(unexpected),
    )
    return Report(tuple(verdicts), unexpected, summary)


def assert_exactly_once(
    dropped: Mapping[str, str],
    catalog: Iterable[CatalogEntry | tuple[str, str, str, bool]],
    *,
    device: str | None = None,
) -> Report:
    """classify() and fail the test with a readable account unless nothing was lost or duplicated."""
    report = classify(dropped, catalog, device=device)
    assert report.summary.valid, report.describe()
    return report


def integrity_check(path: Path) -> str:
    """Run ``PRAGMA integrity_check`` read-only; 'ok' when intact, otherwise SQLite's complaint."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:  # "file is not a database", "malformed": not intact either
        return f"{type(error).__name__}: {error}"
    return "\n".join(str(row[0]) for row in rows)


def assert_databases_intact(directory: Path) -> list[Path]:
    """Check every *.db / *.sqlite / *.sqlite3 under ``directory``; return those checked."""
    # Mosquitto's mosquitto.db shares the suffix but is the broker's own format, not SQLite.
    checked = sorted(p for p in Path(directory).rglob("*")
                     if p.suffix in SQLITE_SUFFIXES and p.is_file() and p.name != "mosquitto.db")
    broken = {p: result for p in checked if (result := integrity_check(p)) != "ok"}
    assert not broken, "SQLite integrity_check failed:\n" + "\n".join(
        f"  {p}: {result}" for p, result in broken.items()
    )
    assert checked, f"no SQLite file under {directory}"
    return checked
