"""Quarantine: move a refused scan into the failed folder with a note saying why.

Only the basename is kept (NFC), never a path from elsewhere; a symlink or FIFO is moved as
itself, never opened or followed. The note ``<name>.reason.txt`` is what a clerk reads when asking
"where did my scan go?", and what ``sohoa edge status`` lists.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from edge.fsutil import atomic_write_bytes, move_durably
from protocol.names import nfc

REASON_SUFFIX = ".reason.txt"


@dataclass(frozen=True, slots=True)
class FailedItem:
    name: str
    reason: str
    since: dt.datetime


def _safe_basename(raw: str) -> str:
    name = nfc(raw).replace("\x00", "").replace("/", "\u2215")
    if name in ("", ".", ".."):
        return "unnamed"
    # Control characters would make the folder listing unreadable for the clerk.
    return "".join(ch if ch.isprintable() else "_" for ch in name)


def _free_name(failed_dir: Path, name: str) -> Path:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    else:
        ext = "." + ext
    number = 1
    while True:
        candidate = name if number == 1 else f"{stem} ({number}){ext}"
        target = failed_dir / candidate
        if not target.is_symlink() and not target.exists() and not (
                failed_dir / (candidate + REASON_SUFFIX)).exists():
            return target
        number += 1


def quarantine(path: Path, failed_dir: Path, reason: str, *, name: str | None = None) -> Path:
    """Move ``path`` into ``failed_dir`` with a reason note; return where it now is.

    ``name`` (default: the file's own basename) lets the caller restore the clerk's original name
    for a file it had renamed, e.g. ``processed/<tid>.pdf``; it is reduced to a safe basename.
    """
    failed_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = _free_name(failed_dir, _safe_basename(path.name if name is None else name))
    move_durably(path, target)
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    one_line = " ".join(reason.split())
    origin = str(path).encode("utf-8", errors="backslashreplace").decode("utf-8")
    note = f"reason: {one_line}\nwhen: {when}\nfrom: {origin}\n"
    atomic_write_bytes(target.with_name(target.name + REASON_SUFFIX), note.encode("utf-8"), 0o644)
    return target


def _read_note(note: Path) -> tuple[str, dt.datetime | None]:
    reason, since = "", None
    try:
        text = note.read_text("utf-8", errors="replace")
    except OSError:
        return "(reason file unreadable)", None
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == "reason":
            reason = value
        elif key == "when":
            try:
                since = dt.datetime.fromisoformat(value)
            except ValueError:
                since = None
    return reason or "(no reason recorded)", since


def list_failed(failed_dir: Path) -> list[FailedItem]:
    """Items in the failed folder with their reasons, oldest first."""
    try:
        names = {entry.name for entry in failed_dir.iterdir()}
    except FileNotFoundError:
        return []
    notes = {n for n in names if n.endswith(REASON_SUFFIX) and n[: -len(REASON_SUFFIX)] in names}
    # A quarantined file that is itself named "*.reason.txt" has its own note.
    items = sorted(n for n in names if n not in notes or n + REASON_SUFFIX in names)
    result = []
    for name in items:
        if name.startswith(".") and name.endswith(".tmp"):
            continue  # an atomic write interrupted by a crash
        note = failed_dir / (name + REASON_SUFFIX)
        if note.exists():
            reason, since = _read_note(note)
        else:
            reason, since = "(reason file missing: the box stopped while quarantining)", None
        if since is None:
            try:
                since = dt.datetime.fromtimestamp((failed_dir / name).lstat().st_mtime, dt.UTC)
            except OSError:
                since = dt.datetime.now(dt.UTC)
        result.append(FailedItem(name, reason, since))
    result.sort(key=lambda item: (item.since, item.name))
    return result
