"""Health, metrics (and who may read them), the OpenAPI document, the demo page and its files."""
from __future__ import annotations

import hmac
import ipaddress
import os
from http import HTTPStatus
from typing import Any

import tornado.web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import ApiError, Unauthorized
from ..util import utcnow
from ..web import write_error
from .base import ApiHandler


class HealthHandler(ApiHandler):
    async def get(self) -> None:
        # "down": the database does not answer; "failing": it answers but refuses writes (disk
        # full, read-only, locked, its file replaced): until they succeed again.
        db = await self.store.health()
        db_ok = db == "ok"
        body = {"status": "ok" if db_ok else "error", "db": db,
                "version": self.settings["version"], "instance": self.config.instance_id,
                "worker": self.config.worker_concurrency > 0,
                "llm": "openai-compatible" if self.config.llm_base_url else "demo"}
        redis_check = self.settings.get("redis_health")
        if redis_check is not None:
            body["redis"] = "ok" if await redis_check() else "down"
        self.reply(body, 200 if db_ok else 503)


class MetricsHandler(ApiHandler):
    async def get(self) -> None:
        self.check_metrics_token()
        metrics = self.metrics
        store = self.store
        for status, count in (await store.count_by_status()).items():
            metrics.tasks.labels(status=status).set(count)
        metrics.queue_depth.set(await store.count_due(utcnow()))
        metrics.connections.set(self.settings["socket_count"]())
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.registry))


    def check_metrics_token(self) -> None:
        """/metrics shows every user's totals, so user tokens do not open it: the operator's
        METRICS_TOKEN does. Unset, it is open to loopback in development and test only."""
        expected = self.config.metrics_token
        if expected is None:
            if self.config.production:
                raise ApiError("Metrics are disabled: set METRICS_TOKEN to read them", 403)
            if not self._from_loopback():
                raise ApiError("Metrics are open to loopback only: set METRICS_TOKEN to read "
                               "them from elsewhere", 403)
            return
        header = self.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise Unauthorized("Authentication required")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected.encode()):
            raise Unauthorized("Invalid metrics token")

    def _from_loopback(self) -> bool:
        # The socket's peer, not request.remote_ip: the server trusts X-Forwarded-For and
        # X-Real-Ip (xheaders=True, for Heroku's router), which any client can send.
        sock = getattr(self.request.connection, "stream", None)
        sock = getattr(sock, "socket", None)
        try:
            peer = sock.getpeername()[0] if sock is not None else ""
            return ipaddress.ip_address(peer.split("%")[0]).is_loopback
        except (OSError, ValueError, IndexError, TypeError):
            return False  # a Unix socket or a closed connection: not provably loopback


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.reply(self.settings["openapi"])


class IndexHandler(ApiHandler):
    """The page's HTML at `/`; any other method is refused in the JSON error shape."""

    def get(self) -> None:
        path = os.path.join(self.settings["static_path"], "index.html")
        with open(path, "rb") as f:
            page = f.read()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(page)


class StaticHandler(tornado.web.StaticFileHandler):
    """/static/..., /favicon.ico and /robots.txt (Tornado routes these to static_path): a file
    that is not there, a folder, or a path outside the folder is a 404 in the JSON error
    shape, like any other unknown path, rather than Tornado's HTML page."""

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        try:
            return super().validate_absolute_path(root, absolute_path)
        except ValueError:  # a NUL byte in the path
            raise tornado.web.HTTPError(404) from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 403:
            # Tornado's 403s here are folders and paths outside the folder: to a client these are
            # files that do not exist, and one answer for all says nothing about the disk.
            status_code = 404
            self.set_status(404)
        if status_code == 405:
            self.set_header("Allow", "GET, HEAD")
        for name in ("Etag", "Last-Modified", "Expires", "Accept-Ranges", "Content-Range"):
            self.clear_header(name)
        write_error(self, status_code,
                    "Cannot %s %s" % (self.request.method, self.request.path)
                    if status_code in (404, 405) else HTTPStatus(status_code).phrase)
