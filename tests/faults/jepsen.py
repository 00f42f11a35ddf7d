"""Judge a fault run the way Jepsen judges a history: every document dropped into a scan folder must end
up in central's catalog as exactly one arrival — not lost, not catalogued twice — every arrival must
come from a drop, the content must be stored once, and every SQLite file must be intact.

Central's model (issue 7, "content once, provenance per arrival"): one stored object per sha256, one
document (arrival) per (device, file name, capture time, text). A drop is matched to arrivals by device,
file name and content. Several transfers may map to one arrival (the same scan re-sent: idempotence),
which is fine; two arrivals for one drop are a duplicate; an arrival no drop explains is unexpected.
Objects are checked too: each content stored once, none missing, none that no arrival points at.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SQLITE_SUFFIXES = frozenset({".db", ".sqlite", ".sqlite3"})
_HEX = frozenset("0123456789abcdef")


class Outcome(StrEnum):
    OK = "ok"
    LOST = "lost"
    DUPLICATED = "duplicated"


def _check_sha(sha256: str) -> None:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One document row of central's catalog, with every stored transfer that maps to it."""

    document_id: int
    device: str
    filename: str
    sha256: str
    tids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_sha(self.sha256)


@dataclass(frozen=True, slots=True)
class CatalogView:
    """What the checker needs of a catalog: its arrivals and its stored objects (one sha256 per row)."""

    arrivals: tuple[Arrival, ...]
    objects: tuple[str, ...]

    def __post_init__(self) -> None:
        for sha in self.objects:
            _check_sha(sha)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happened to one dropped document."""

    name: str
    sha256: str
    outcome: Outcome
    arrivals: tuple[int, ...]    # document ids matching this drop
    tids: tuple[str, ...]        # every transfer that carried it


@dataclass(frozen=True, slots=True)
class Summary:
    dropped: int
    ok: int
    lost: int
    duplicated: int
    unexpected: int
    object_problems: int

    @property
    def valid(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0 and self.object_problems == 0


@dataclass(frozen=True, slots=True)
class Report:
    verdicts: tuple[Verdict, ...]
    unexpected: tuple[Arrival, ...]
    object_problems: tuple[str, ...]
    summary: Summary

    def with_outcome(self, outcome: Outcome) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.outcome is outcome)

    def describe(self) -> str:
        s = self.summary
        lines = [f"{s.dropped} dropped: {s.ok} ok, {s.lost} lost, {s.duplicated} duplicated, "
                 f"{s.unexpected} unexpected arrivals, {s.object_problems} object problems"]
        lines += [f"  {v.outcome.value}: {v.name} ({v.sha256[:12]}…, arrivals {list(v.arrivals)}, "
                  f"tids {list(v.tids)})" for v in self.verdicts if v.outcome is not Outcome.OK]
        lines += [f"  unexpected: document {a.document_id} {a.filename!r} ({a.sha256[:12]}…) from {a.device}"
                  for a in self.unexpected]
        lines += [f"  objects: {problem}" for problem in self.object_problems]
        return "\n".join(lines)


def classify(dropped: Mapping[str, str], catalog: CatalogView, *, device: str | None = None) -> Report:
    """Classify each drop (file name → sha256) against central's arrivals and objects.

    ``device`` restricts the judgement to one edge's arrivals when several edges share a central;
    objects are then only required for that edge's contents (others may hold more).
    """
    arrivals = [a for a in catalog.arrivals if device is None or a.device == device]
    by_drop: defaultdict[tuple[str, str], list[Arrival]] = defaultdict(list)
    for arrival in arrivals:
        by_drop[(arrival.filename, arrival.sha256)].append(arrival)

    verdicts = []
    for name, given in sorted(dropped.items()):
        sha = given.lower()
        matching = sorted(by_drop.get((name, sha), []), key=lambda a: a.document_id)
        outcome = (Outcome.LOST if not matching else Outcome.OK if len(matching) == 1 else Outcome.DUPLICATED)
        verdicts.append(Verdict(name, sha, outcome, tuple(a.document_id for a in matching),
                                tuple(sorted(t for a in matching for t in a.tids))))
    drops = {(name, sha.lower()) for name, sha in dropped.items()}
    unexpected = tuple(a for a in arrivals if (a.filename, a.sha256) not in drops)

    object_problems: list[str] = []
    stored = Counter(catalog.objects)
    object_problems += [f"{sha[:12]}… stored {n} times" for sha, n in sorted(stored.items()) if n > 1]
    needed = {a.sha256 for a in arrivals}
    object_problems += [f"{sha[:12]}… has arrivals but no stored object"
                        for sha in sorted(needed - set(stored))]
    if device is None:
        object_problems += [f"{sha[:12]}… is stored but no arrival points at it"
                            for sha in sorted(set(stored) - needed)]

    by_outcome = Counter(v.outcome for v in verdicts)
    summary = Summary(dropped=len(verdicts), ok=by_outcome[Outcome.OK], lost=by_outcome[Outcome.LOST],
                      duplicated=by_outcome[Outcome.DUPLICATED], unexpected=len(unexpected),
                      object_problems=len(object_problems))
    return Report(tuple(verdicts), unexpected, tuple(object_problems), summary)


def assert_exactly_once(dropped: Mapping[str, str], catalog: CatalogView, *,
                        device: str | None = None) -> Report:
    """classify() and fail the test with a readable account unless every drop is exactly one arrival,
    every arrival is a drop, and every content is stored exactly once."""
    report = classify(dropped, catalog, device=device)
    assert report.summary.valid, report.describe()
    return report


def resent_arrivals(catalog: CatalogView) -> list[Arrival]:
    """Arrivals that more than one transfer carried (a scan sent twice under two transfer ids)."""
    return [a for a in catalog.arrivals if len(a.tids) > 1]


def view(arrivals: Iterable[Arrival], objects: Iterable[str]) -> CatalogView:
    return CatalogView(tuple(arrivals), tuple(objects))


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
