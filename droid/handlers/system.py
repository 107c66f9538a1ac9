"""Health, metrics, the OpenAPI document and the demo page."""
from __future__ import annotations

import os

import tornado.web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..store import ACTIVE, FINAL
from ..util import utcnow
from .base import ApiHandler


class HealthHandler(ApiHandler):
    async def get(self) -> None:
        db_ok = await self.store.ping()
        body = {"status": "ok" if db_ok else "error", "db": "ok" if db_ok else "down",
                "version": self.settings["version"], "instance": self.config.instance_id,
                "worker": self.config.worker_concurrency > 0,
                "llm": "openai-compatible" if self.config.llm_base_url else "demo"}
        redis_check = self.settings.get("redis_health")
        if redis_check is not None:
            body["redis"] = "ok" if await redis_check() else "down"
        self.reply(body, 200 if db_ok else 503)


class MetricsHandler(ApiHandler):
    async def get(self) -> None:
        self.authenticate()
        metrics = self.metrics
        store = self.store
        for status in ACTIVE + FINAL:
            metrics.tasks.labels(status=status).set(await store.count_tasks({"status": status}))
        metrics.queue_depth.set(await store.count_tasks(
            {"status": "pending", "runAfter": {"$lte": utcnow()}}))
        metrics.connections.set(len(self.settings["gateway"].sockets))
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.registry))


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.reply(self.settings["openapi"])


class IndexHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        path = os.path.join(self.settings["static_path"], "index.html")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        with open(path, "rb") as f:
            self.finish(f.read())
