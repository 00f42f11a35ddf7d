"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import web

from central.config import CentralConfig
from central.db import Database
from central.limiter import LoginLimiter
from central.metrics import Metrics
from central.operators import Principal
from central.service import IngestSupervisor

CONFIG = web.AppKey("config", CentralConfig)
METRICS = web.AppKey("metrics", Metrics)
READER = web.AppKey("reader", Database)
INGEST = web.AppKey("ingest", IngestSupervisor)
AUTH_DB = web.AppKey("auth_db", Database)           # a writer for sessions and the audit log
LIMITER = web.AppKey("login_limiter", LoginLimiter)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
