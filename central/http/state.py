"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import web

from central.admin.operators import Principal
from central.catalog.db import Database
from central.config import CentralConfig
from central.http.limiter import LoginLimiter
from central.ingest.service import IngestSupervisor
from central.metrics import Metrics

CONFIG = web.AppKey("config", CentralConfig)
METRICS = web.AppKey("metrics", Metrics)
READER = web.AppKey("reader", Database)
INGEST = web.AppKey("ingest", IngestSupervisor)
AUTH_DB = web.AppKey("auth_db", Database)           # a writer for sessions and the audit log
LIMITER = web.AppKey("login_limiter", LoginLimiter)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
