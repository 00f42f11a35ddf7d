"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from central.config import CentralConfig
from central.db import Database
from central.metrics import Metrics

if TYPE_CHECKING:
    from central.auth import LoginLimiter
    from central.operators import Principal
    from central.service import IngestSupervisor

CONFIG = web.AppKey("config", CentralConfig)
METRICS = web.AppKey("metrics", Metrics)
READER = web.AppKey("reader", Database)
INGEST: web.AppKey[IngestSupervisor] = web.AppKey("ingest")
AUTH_DB = web.AppKey("auth_db", Database)           # a writer for sessions and the audit log
LIMITER: web.AppKey[LoginLimiter] = web.AppKey("login_limiter")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
