"""Hostile but validly signed envelopes: decompression bombs and tar tricks, with RSS and disk checked.

A device key can be stolen, so everything after the signature check must still assume an enemy.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from central import catalog
from central.config import CentralConfig
from central.ingest import Ingestor
from central.keys import CentralKeys, load_keys
from protocol.bag import HOCR, METADATA, TEXT
from protocol.messages import Ack, AckState
from tests.central.builders import package_members, seal_stream, tar_of, wire
from tests.central.conftest import Bundle, Enroll
from tests.support.files import leftover_files

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
RSS_BUDGET = 96 * MiB      # above the interpreter's own baseline, whatever the expansion

# The child only ingests (the wire messages come from a file), so its peak RSS is the ingest's.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest).
BOMB_SCRIPT = """\
import json, pickle, sys
from pathlib import Path
from central import catalog
from central.config import load_config
from central.ingest import Ingestor
from central.keys import load_keys
config = load_config(Path(sys.argv[1]))
keys = load_keys(config.paths)
conn = catalog.connect(config.paths.catalog)
ingestor = Ingestor(conn, config.paths, keys, max_plaintext=config.ingest.max_plaintext_bytes)
items = pickle.loads(Path(sys.argv[2]).read_bytes())
def hwm_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
baseline = hwm_kb()
replies = ingestor.handle_batch(items)
peak = hwm_kb()
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak,
                  "replies": [[r.state.value, r.error_class] for r in replies if hasattr(r, "state")],
                  "documents": conn.execute("SELECT count(*) FROM documents").fetchone()[0]}))
"""


def run_bomb(config: CentralConfig, bundle: Bundle, size: int, tmp_path: Path) -> dict[str, object]:
    keys = load_keys(config.paths)
    zeros = bytes(MiB)
    sealed = seal_stream(device=bundle.device_id, seq=1, signing_key=bundle.signing_key,
                         central_key=keys.encryption.public_key, size=size,
                         pieces=(zeros for _ in range(size // MiB)))
    messages = tmp_path / "bomb.pickle"
    messages.write_bytes(pickle.dumps(wire(sealed.messages(64 * 1024))))
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(config.home), str(messages)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["ciphertext"] = len(sealed.ciphertext)
    return result


def check_bomb(result: dict[str, object], size: int) -> None:
    grown = (int(str(result["peak_kb"])) - int(str(result["baseline_kb"]))) * 1024
    replies = result["replies"]
    assert isinstance(replies, list)
    print(f"bomb: {result['ciphertext']} B ciphertext → {size / MiB:.0f} MiB declared+actual; "
          f"peak RSS {int(str(result['peak_kb'])) / 1024:.0f} MiB, grew {grown / MiB:.1f} MiB during "
          f"ingest; replies {replies}")
    assert result["documents"] == 0
    assert ["rejected", "BagError"] in replies
    assert grown < RSS_BUDGET


def test_zstd_bomb_is_rejected_with_bounded_memory(config: CentralConfig, enroll: Enroll,
                                                   tmp_path: Path) -> None:
    size = 256 * MiB
    check_bomb(run_bomb(config, enroll("xa-tan-trao"), size, tmp_path), size)
    assert leftover_files(config.paths.tmp) == []   # the expanded bytes did not stay on disk


@pytest.mark.torture
def test_two_gib_zstd_bomb(config: CentralConfig, enroll: Enroll, tmp_path: Path) -> None:
    size = 2048 * MiB
    check_bomb(run_bomb(config, enroll("xa-tan-trao"), size, tmp_path), size)


def ingest(config: CentralConfig, keys: CentralKeys, package_pieces: list[bytes], size: int, bundle: Bundle,
           *, seq: int = 1, max_plaintext: int | None = None, doc_id: bytes | None = None) -> list[Ack]:
    conn = catalog.connect(config.paths.catalog)
    try:
        ingestor = Ingestor(conn, config.paths, keys,
                            max_plaintext=max_plaintext or config.ingest.max_plaintext_bytes)
        sealed = seal_stream(device=bundle.device_id, seq=seq, signing_key=bundle.signing_key,
                             central_key=keys.encryption.public_key, pieces=package_pieces, size=size,
                             doc_id=doc_id)
        replies = ingestor.handle_batch(wire(sealed.messages(64 * 1024)))
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 0
    finally:
        conn.close()
    return [r for r in replies if isinstance(r, Ack)]


def test_declared_expansion_over_the_cap_is_refused_before_any_byte(config: CentralConfig,
                                                                    central_keys: CentralKeys,
                                                                    enroll: Enroll) -> None:
    bundle = enroll("xa-tan-trao")
    zeros = bytes(MiB)
    acks = ingest(config, central_keys, [zeros] * 64, 64 * MiB, bundle, max_plaintext=16 * MiB)
    assert {(a.state, a.error_class) for a in acks} == {(AckState.REJECTED, "SizeLimitError")}
    assert list(config.paths.staging.iterdir()) == []   # not one segment was staged


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


HOSTILE = ["traversal", "absolute", "symlink", "hardlink", "extra", "duplicate", "fifo", "directory"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_tar_members_are_rejected_and_nothing_is_written(kind: str, config: CentralConfig,
                                                                 central_keys: CentralKeys, enroll: Enroll,
                                                                 tmp_path: Path) -> None:
    bundle = enroll("xa-tan-trao")
    outside = tmp_path / f"evil-{secrets.token_hex(4)}"
    doc_id = secrets.token_bytes(16)
    tid = doc_id.hex()
    members = [(n, d, tarfile.REGTYPE, "") for n, d in package_members(
        device=bundle.device_id, tid=doc_id.hex(), seq=1, original=b"%PDF-1.4 evil",
        name="Công văn số 5 – Tuyên Quang.pdf", text="Quyết định")]
    escape = os.path.relpath(outside, config.paths.tmp)
    if kind == "traversal":
        members[3] = (escape, members[3][1], tarfile.REGTYPE, "")
    elif kind == "absolute":
        members[3] = (str(outside), members[3][1], tarfile.REGTYPE, "")
    elif kind == "symlink":
        members[-1] = (members[-1][0], b"", tarfile.SYMTYPE, str(outside))
    elif kind == "hardlink":
        members[-1] = (members[-1][0], b"", tarfile.LNKTYPE, "bagit.txt")
    elif kind == "extra":
        members.append((escape, b"#!/bin/sh\nrm -rf /\n", tarfile.REGTYPE, ""))
    elif kind == "duplicate":
        members.insert(4, members[3])
    elif kind == "fifo":
        members[-1] = (members[-1][0], b"", tarfile.FIFOTYPE, "")
    elif kind == "directory":
        members[4] = (TEXT, b"", tarfile.DIRTYPE, "")
    assert {m[0] for m in members} >= {METADATA, HOCR} or kind in ("traversal", "absolute")
    package = tar_of(members)
    before = snapshot(tmp_path)   # the home and everything around it
    acks = ingest(config, central_keys, [package], len(package), bundle, doc_id=doc_id)
    assert {(a.state, a.error_class) for a in acks} == {(AckState.REJECTED, "BagError")}, acks
    created = {p.relative_to(config.home).as_posix() for p in snapshot(tmp_path) - before
               if not p.name.startswith("catalog.db") and not (p.is_dir() and p.parent == config.paths.tmp)}
    # Only bookkeeping appears: the quarantined ciphertext and its reason (plus SQLite's files and
    # the worker's empty working folder).
    assert created == {f"quarantine/{tid}.part", f"quarantine/{tid}.reason.json"}
    assert not outside.exists() and not Path("/etc/passwd").is_symlink()
    assert list(config.paths.objects.rglob("*")) == [] and leftover_files(config.paths.tmp) == []
