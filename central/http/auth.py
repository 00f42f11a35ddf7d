"""Who may call what over HTTP: bearer tokens, dashboard sessions, CSRF, login rate limiting.

- ``/api/*`` needs a principal: ``Authorization: Bearer`` (the bootstrap ``HOME/api-token`` is an
  admin; tokens from ``sohoa central token create`` carry their role) or the session cookie.
- The session cookie is HttpOnly + SameSite=Strict; every state-changing request made with it
  must also carry ``X-CSRF-Token`` (bearer requests carry no ambient credential, so need none).
- ``/login`` takes JSON only (a cross-site form cannot send it) and is rate limited per client
  address and per name; failures are audited without the password.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from central import catalog
from central.admin import operators
from central.admin.operators import Principal
from central.http.state import AUTH_DB, CONFIG, LIMITER, PRINCIPAL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COOKIE = "sohoa_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _json_error(cls: type[web.HTTPException], error: str, hint: str, **kw: Any) -> web.HTTPException:
    return cls(text=json.dumps({"error": error, "hint": hint}), content_type="application/json", **kw)


def unauthorized() -> web.HTTPException:
    return _json_error(web.HTTPUnauthorized, "missing, wrong or revoked credentials",
                       "log in on the dashboard, or send Authorization: Bearer <token>",
                       headers={"WWW-Authenticate": 'Bearer realm="sohoa"'})


def forbidden(why: str) -> web.HTTPException:
    return _json_error(web.HTTPForbidden, why, "ask an admin for a role that allows this")


async def principal_of(request: web.Request) -> Principal | None:
    db = request.app[AUTH_DB]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if hmac.compare_digest(token.encode(), request.app[CONFIG].api_token.encode()):
            return Principal("bootstrap", "admin", "bootstrap")
        return await db.call(operators.token_principal, token)
    session_id = request.cookies.get(COOKIE)
    if session_id:
        return await db.call(operators.session_principal, session_id)
    return None


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the principal; refuse /api without one and session writes without the CSRF token."""
    principal = await principal_of(request)
    if principal is not None:
        request[PRINCIPAL] = principal
    if request.path.startswith("/api/") or request.path == "/logout":
        if principal is None:
            raise unauthorized()
        if principal.kind == "session" and request.method not in SAFE_METHODS:
            sent = request.headers.get("X-CSRF-Token", "")
            if not principal.csrf or not hmac.compare_digest(sent.encode(), principal.csrf.encode()):
                raise _json_error(web.HTTPForbidden, "missing or wrong CSRF token",
                                  "send X-CSRF-Token from GET /api/session")
    return await handler(request)


def require(request: web.Request, role: str) -> Principal:
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None:
        raise unauthorized()
    if not principal.can(role):
        raise forbidden(f"{principal.actor} is a {principal.role}; this needs {role}")
    return principal


async def audit(request: web.Request, action: str, target: str | None, detail: dict[str, Any]) -> None:
    principal = request[PRINCIPAL]

    def write(conn: Any) -> None:
        catalog.add_audit(conn, actor=principal.actor, action=action, target=target, remote=request.remote,
                          detail=json.dumps(detail, ensure_ascii=False))
        conn.commit()

    await request.app[AUTH_DB].call(write)


def _login_fields(body: Any) -> tuple[str, str] | None:
    """(name, password) from a login body, or None unless both are strings of encodable text."""
    if not isinstance(body, dict):
        return None
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        return None
    try:   # JSON may escape a lone surrogate, which no database or hash function can take
        name.encode("utf-8")
        password.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name, password


async def login(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise _json_error(web.HTTPUnsupportedMediaType, "login takes application/json",
                          'POST {"name": ..., "password": ...}')
    try:
        fields = _login_fields(await request.json())
    except ValueError:
        fields = None
    if fields is None:
        raise _json_error(web.HTTPBadRequest, "malformed login",
                          'send {"name": "...", "password": "..."} (strings of UTF-8 text)')
    name, password = fields
    keys = (f"addr:{request.remote}", f"name:{name[:64]}")
    limiter = request.app[LIMITER]
    wait = limiter.retry_after(keys)
    if wait > 0:
        raise _json_error(web.HTTPTooManyRequests, "too many failed logins", f"retry in {wait:.0f} s",
                          headers={"Retry-After": str(int(wait) + 1)})
    db = request.app[AUTH_DB]
    role = await db.call(operators.check_login, name, password)
    if role is None:
        limiter.failed(keys)

        def failed(conn: Any) -> None:
            catalog.add_audit(conn, actor=f"anonymous@{request.remote}", action="login_failed",
                              target=name[:64], remote=request.remote)
            conn.commit()

        await db.call(failed)
        raise unauthorized()
    limiter.succeeded(keys)
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)

    def opened(conn: Any) -> None:
        operators.create_session(conn, name, session_id, csrf)
        catalog.add_audit(conn, actor=f"session:{name}", action="login", target=name, remote=request.remote)
        conn.commit()

    await db.call(opened)
    response = web.json_response({"operator": name, "role": role, "csrf": csrf})
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", path="/",
                        max_age=operators.SESSION_TTL_S, secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    session_id = request.cookies.get(COOKIE)
    if session_id:
        def end(conn: Any) -> None:
            operators.end_session(conn, session_id)
            conn.commit()

        await request.app[AUTH_DB].call(end)
    response = web.json_response({"logged_out": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def session(request: web.Request) -> web.Response:
    principal = require(request, "viewer")
    return web.json_response({"operator": principal.name, "role": principal.role, "kind": principal.kind,
                              "csrf": principal.csrf})
