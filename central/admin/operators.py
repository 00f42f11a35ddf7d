"""Operator accounts, API tokens and dashboard sessions: plain SQL over the catalog connection.

Passwords are argon2id (libsodium via PyNaCl, interactive limits); tokens and session ids are
random 256-bit strings stored only as sha256, so a copied catalog yields no usable credential.
Functions do not commit unless their caller does (same rule as ``central.catalog``).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
import time
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.pwhash

from central.admin.roles import ROLES  # one list, also read by the CLI without importing this module
from central.catalog import utc_now
from central.errors import CentralError

SESSION_TTL_S = 8 * 3600
MIN_PASSWORD = 12
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@functools.cache
def _dummy_hash() -> bytes:
    """Verified against when the name is unknown, so a miss costs the same time as a wrong password.

    Made on first use, not at import: every ``sohoa`` command (``edge run`` on a 2 GB box included)
    imports this module, and an argon2id hash costs 64 MiB and ~0.1 s.
    """
    argon2id = nacl.pwhash.argon2id
    return argon2id.str(b"sohoa-dummy-password", opslimit=argon2id.OPSLIMIT_INTERACTIVE,
                        memlimit=argon2id.MEMLIMIT_INTERACTIVE)


class OperatorError(CentralError):
    """An operator or token command cannot be carried out."""

    hint = "see `sohoa central user --help` and `sohoa central token --help`"
    exit_code = 65


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request: ``kind`` is 'session', 'token' or 'bootstrap'."""

    name: str
    role: str
    kind: str
    csrf: str | None = field(default=None, repr=False)

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise OperatorError(f"name {name[:80]!r} must be 1-64 of a-z, 0-9, '.', '_', '-'")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise OperatorError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def add_operator(conn: sqlite3.Connection, name: str, role: str, password: str) -> None:
    check_name(name)
    check_role(role)
    if len(password) < MIN_PASSWORD:
        raise OperatorError(f"password must be at least {MIN_PASSWORD} characters")
    hashed = nacl.pwhash.argon2id.str(password.encode(), opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
                                      memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE)
    conn.execute("INSERT INTO operators (name, role, pwhash, created_at) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT (name) DO UPDATE SET role = excluded.role, pwhash = excluded.pwhash,"
                 " disabled = 0",
                 (name, role, hashed, utc_now()))


def check_login(conn: sqlite3.Connection, name: str, password: str) -> str | None:
    """The operator's role if the password is right, else None (same cost either way)."""
    row = conn.execute("SELECT role, pwhash FROM operators WHERE name = ? AND disabled = 0",
                       (name,)).fetchone()
    hashed = bytes(row["pwhash"]) if row else _dummy_hash()
    try:
        nacl.pwhash.verify(hashed, password.encode())
    except nacl.exceptions.InvalidkeyError:
        return None
    return str(row["role"]) if row else None


def create_token(conn: sqlite3.Connection, name: str, role: str, token: str) -> None:
    check_name(name)
    check_role(role)
    try:
        conn.execute("INSERT INTO api_tokens (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
                     (name, role, digest(token), utc_now()))
    except sqlite3.IntegrityError as exc:
        raise OperatorError(f"a token named {name!r} already exists (revoked names stay taken)") from exc


def revoke_token(conn: sqlite3.Connection, name: str) -> bool:
    cur = conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                       (utc_now(), name))
    return cur.rowcount == 1


def token_principal(conn: sqlite3.Connection, token: str) -> Principal | None:
    row = conn.execute("SELECT name, role FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                       (digest(token),)).fetchone()
    return Principal(row["name"], row["role"], "token") if row else None


def create_session(conn: sqlite3.Connection, operator: str, session_id: str, csrf: str) -> None:
    now = time.time()
    conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
    conn.execute("INSERT INTO sessions (id_hash, operator, csrf, created_at, expires_at)"
                 " VALUES (?, ?, ?, ?, ?)",
                 (digest(session_id), operator, csrf, utc_now(), now + SESSION_TTL_S))


def session_principal(conn: sqlite3.Connection, session_id: str) -> Principal | None:
    row = conn.execute(
        "SELECT s.operator, s.csrf, o.role FROM sessions s JOIN operators o ON o.name = s.operator"
        " WHERE s.id_hash = ? AND s.expires_at > ? AND o.disabled = 0",
        (digest(session_id), time.time())).fetchone()
    return Principal(row["operator"], row["role"], "session", row["csrf"]) if row else None


def end_session(conn: sqlite3.Connection, session_id: str) -> None:
    conn.execute("DELETE FROM sessions WHERE id_hash = ?", (digest(session_id),))


def list_operators(conn: sqlite3.Connection) -> list[dict[str, object]]:
    rows = conn.execute("SELECT o.name, o.role, o.created_at, o.disabled,"
                        " (SELECT count(*) FROM sessions s WHERE s.operator = o.name AND s.expires_at > ?)"
                        " AS sessions FROM operators o ORDER BY o.name", (time.time(),))
    return [{"name": r["name"], "role": r["role"], "created_at": r["created_at"],
             "disabled": bool(r["disabled"]), "sessions": int(r["sessions"])} for r in rows]


def remove_operator(conn: sqlite3.Connection, name: str) -> bool:
    """Disable the account and end its sessions; the row stays, so the audit log keeps its actor."""
    cur = conn.execute("UPDATE operators SET disabled = 1 WHERE name = ? AND disabled = 0", (name,))
    conn.execute("DELETE FROM sessions WHERE operator = ?", (name,))
    return cur.rowcount == 1


def list_tokens(conn: sqlite3.Connection) -> list[dict[str, object]]:
    rows = conn.execute("SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY name")
    return [dict(r) for r in rows]
