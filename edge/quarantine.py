"""Refused scans go back to the clerk: a folder inside the scan share, a reason note beside each.

The refused folder (default ``_Lỗi`` in the scan folder) is where a clerk already looks; the intake
ignores it. Only the basename is kept (NFC), never a path from elsewhere; a symlink or FIFO is
moved as itself, never opened or followed. The note ``<name>.lý-do.txt`` says in Vietnamese (and
English) what happened and what to do; :func:`restore` is ``sohoa edge retry``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from edge.fsutil import atomic_write_bytes, move_durably
from edge.reasons import note_text
from protocol.names import nfc

REASON_SUFFIX = ".lý-do.txt"
LEGACY_SUFFIX = ".reason.txt"
_SUFFIXES = (REASON_SUFFIX, LEGACY_SUFFIX)


@dataclass(frozen=True, slots=True)
class FailedItem:
    name: str
    reason: str          # what the clerk reads (Vietnamese), or the detail for an old note
    detail: str          # the technical reason, for the administrator
    since: dt.datetime
    code: str | None = None


def safe_basename(raw: str) -> str:
    name = nfc(raw).replace("\x00", "").replace("/", "\u2215")
    if name in ("", ".", ".."):
        return "unnamed"
    # Control characters would make the folder listing unreadable for the clerk.
    return "".join(ch if ch.isprintable() else "_" for ch in name)


# A file system takes 255-byte names. Beside a refused scan go its note (``REASON_SUFFIX``) and,
# while either is written, a temporary ``.<name>.XXXXXXXX.tmp``: a name the clerk's Windows let
# through Samba (up to 255 bytes) is shortened so that all of them fit.
NAME_MAX = 255
_ROOM_BESIDE = len(os.fsencode("." + REASON_SUFFIX + ".XXXXXXXX.tmp"))


def _fitting(stem: str, tail: str) -> str:
    """``stem + tail``, the stem cut (whole characters, "…" marking the cut) to leave room."""
    limit = NAME_MAX - _ROOM_BESIDE
    if len(os.fsencode(stem + tail)) <= limit:
        return stem + tail
    while stem and len(os.fsencode(stem.rstrip() + "…" + tail)) > limit:
        stem = stem[:-1]
    return stem.rstrip() + "…" + tail


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name (2).ext``… if that (or its note) is taken; a name too long to
    keep a note and a temporary file beside it is shortened (the note keeps the full name)."""
    name = safe_basename(name)
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(os.fsencode(ext)) > 16:
        stem, ext = name, ""
    else:
        ext = "." + ext
    number = 1
    while True:
        candidate = _fitting(stem, ext if number == 1 else f" ({number}){ext}")
        target = folder / candidate
        if not os.path.lexists(target) and not any(
                os.path.lexists(folder / (candidate + suffix)) for suffix in _SUFFIXES):
            return target
        number += 1


def note_path(target: Path) -> Path:
    return target.with_name(target.name + REASON_SUFFIX)


def write_note(target: Path, *, code: str | None, detail: str, tid: str | None = None,
               name: str | None = None) -> None:
    """The reason note beside ``target``; ``name`` is the clerk's own (``target`` may be shortened)."""
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    text = note_text(name=name or target.name, code=code, detail=detail, when=when, tid=tid)
    # Readable by the clerk over the share, like the scan itself.
    atomic_write_bytes(note_path(target), text.encode("utf-8"), 0o644)


def quarantine(path: Path, refused_dir: Path, reason: str, *, name: str | None = None,
               code: str | None = None, tid: str | None = None) -> Path:
    """Move ``path`` into ``refused_dir`` with a reason note; return where it now is.

    ``name`` (default: the file's own basename) restores the clerk's original name for a file the
    box had renamed (``processed/<tid>.pdf``); it is reduced to a safe basename.
    """
    refused_dir.mkdir(parents=True, exist_ok=True)
    target = free_name(refused_dir, path.name if name is None else name)
    place(path, target, code=code, detail=reason, tid=tid, name=name)
    return target


def place(path: Path, target: Path, *, code: str | None, detail: str, tid: str | None = None,
          name: str | None = None) -> None:
    """The two steps of a quarantine to a chosen target: the file, then its note."""
    move_durably(path, target)
    with contextlib.suppress(OSError):
        if not target.is_symlink():
            target.chmod(0o644)   # the clerk's own scan, back on the share (best effort: owner)
    write_note(target, code=code, detail=detail, tid=tid, name=name)


def _read_note(note: Path) -> tuple[str, str, str | None, dt.datetime | None]:
    reason, code, since, what = "", None, None, ""
    try:
        text = note.read_text("utf-8", errors="replace")
    except OSError:
        return "(reason file unreadable)", "", None, None
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == "reason":
            reason = value
        elif key == "Lý do":
            what = value
        elif key == "code":
            code = value
        elif key == "when":
            try:
                since = dt.datetime.fromisoformat(value)
            except ValueError:
                since = None
    return what or reason or "(no reason recorded)", reason, code, since


def _note_for(folder: Path, name: str, names: set[str]) -> Path | None:
    for suffix in _SUFFIXES:
        if name + suffix in names:
            return folder / (name + suffix)
    return None


def _is_note(name: str, names: set[str]) -> bool:
    """A reason note (of a scan still there, or orphaned after the clerk took the scan away) —
    unless it is itself a refused file that has its own note."""
    return name.endswith(_SUFFIXES) and not _note_for_name(name, names)


def _note_for_name(name: str, names: set[str]) -> bool:
    return any(name + suffix in names for suffix in _SUFFIXES)


def list_failed(refused_dir: Path) -> list[FailedItem]:
    """Items in the refused folder with their reasons, oldest first."""
    try:
        names = {entry.name for entry in refused_dir.iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        return []
    result = []
    for name in sorted(names):
        if name.startswith(".") and name.endswith(".tmp"):
            continue  # an atomic write interrupted by a crash
        if _is_note(name, names):
            continue
        note = _note_for(refused_dir, name, names)
        if note is not None:
            reason, detail, code, since = _read_note(note)
        else:
            reason, detail, code, since = ("(reason file missing: the box stopped while quarantining)", "",
                                           None, None)
        if since is None:
            try:
                since = dt.datetime.fromtimestamp((refused_dir / name).lstat().st_mtime, dt.UTC)
            except OSError:
                since = dt.datetime.now(dt.UTC)
        result.append(FailedItem(name, reason, detail, since, code))
    result.sort(key=lambda item: (item.since, item.name))
    return result


class RefusedScanMissing(FileNotFoundError):
    """``edge retry NAME`` names no refused scan (a typo, or it was taken back already)."""

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(f"no refused scan named {name!r} in {folder}")
        self.name = name
        self.folder = folder


def restore(refused_dir: Path, name: str, watch_dir: Path) -> Path:
    """Put one refused scan back into the scan folder (``sohoa edge retry``); return its new path.

    The note goes away with it; the intake sees a file moved in and takes it as a new scan.
    """
    source = refused_dir / safe_basename(name)
    if not os.path.lexists(source) or source.name.endswith(_SUFFIXES):
        raise RefusedScanMissing(name, refused_dir)
    target = free_name(watch_dir, source.name)
    move_durably(source, target)
    for suffix in _SUFFIXES:
        (refused_dir / (source.name + suffix)).unlink(missing_ok=True)
    return target
