"""make_app(): the one place where Droid is wired together, and its start/stop lifecycle."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.log import access_log

from . import __version__, logsafe
from .apikeys import ApiKeys
from .auth import Passwords, Tokens
from .config import Config
from .http.api import (AgentsHandler, CancelHandler, LoginHandler, MeHandler, RegisterHandler,
                       TaskHandler, TasksHandler)
from .http.base import NotFoundHandler
from .http.eventlog import EventsHandler, EventStreamHandler
from .http.front import Front, server_options
from .http.keys import ApiKeyHandler, ApiKeysHandler
from .http.listener import Listener, default_max_connections, descriptor_limit
from .http.openapi import build_openapi
from .http.ratelimit import AuthLimits
from .http.system import (HealthHandler, IndexHandler, MetricsHandler, OpenApiHandler,
                          StaticHandler)
from .http.webhooks import (DeliveriesHandler, RetryDeliveryHandler, RotateSecretHandler,
                            SendTestHandler, WebhookHandler, WebhooksHandler)
from .metrics import Metrics
from .quotas import Quota
from .realtime.endpoint import MAX_PACKET, Realtime
from .realtime.wire import NAMESPACE
from .store import Store, store_from_config
from .tasks.agents import AgentService
from .tasks.llm import make_provider
from .tasks.service import EventsService, TaskService
from .tasks.worker import Worker
from .web import Origins
from .webhooks import Webhooks

log = logging.getLogger(__name__)

# a bearer token, and an Engine.IO session id (whoever holds it holds the session)
_TOKEN_PARAM = re.compile(r"([?&](?:token|sid)=)[^&]*")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with `?token=` and `?sid=` redacted."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):  # no redaction or timing for a line nobody keeps
        return
    access_log.log(level, "%d %s %s (%s) %.2fms", status, handler.request.method,
                   _TOKEN_PARAM.sub(r"\1[redacted]", handler.request.uri or ""),
                   handler.request.remote_ip, 1000 * handler.request.request_time())


def static_path() -> str:
    """The demo page's folder: droid/static in an installed package (setup.cfg ships the
    repository's static/ there), else static/ beside droid/ (a source tree, an editable
    install). Found from this file, never from the working directory."""
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(package, "static"),
                   os.path.join(os.path.dirname(package), "static")):
        if os.path.isfile(os.path.join(folder, "index.html")):
            return folder
    raise RuntimeError(f"the demo page is missing: no static/index.html in or beside {package}")


class Droid:
    """One running Droid: HTTP server, Socket.IO server, worker, and the services between them."""

    def __init__(self, config: Config, *, store: Store, realtime: Realtime,
                 application: tornado.web.Application, worker: Worker, tasks: TaskService,
                 api_keys: ApiKeys, webhooks: Webhooks, redis: Any = None,
                 owns_store: bool = True) -> None:
        self.config = config
        self.store = store
        self.realtime = realtime
        self.events = realtime.publisher
        self.sio = realtime.sio
        self.gateway = realtime.gateway
        self.presence = realtime.presence
        self.application = application
        self.worker = worker
        self.tasks = tasks
        self.api_keys = api_keys
        self.webhooks = webhooks
        self.redis = redis
        self.owns_store = owns_store
        self.server: tornado.httpserver.HTTPServer | None = None
        self.listener: Listener | None = None
        self.port: int | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen (on the given sockets, else on HOST:PORT) and start the background work."""
        if sockets is None:
            sockets = tornado.netutil.bind_sockets(self.config.port, self.config.host)
        self.server = tornado.httpserver.HTTPServer(self.application,
                                                    **server_options(self.config))
        self.listener = Listener(self.server, self._max_connections())
        self.listener.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        await self.realtime.start()
        await self.worker.start()
        await self.api_keys.start()
        await self.webhooks.start()

    def _max_connections(self) -> int:
        limit = descriptor_limit()
        cap = self.config.max_connections or default_max_connections(limit)
        if cap > default_max_connections(limit):
            log.warning("DROID_MAX_CONNECTIONS=%d leaves less than a tenth of the descriptor "
                        "limit (%d) for the rest: accepting may run out of descriptors first",
                        cap, limit)
        return cap

    async def stop(self) -> None:
        """Stop in reverse order of start: listening, the worker, sockets, storage."""
        if self._stopped:
            return
        self._stopped = True
        if self.listener is not None:
            self.listener.stop()
        await self.worker.stop()
        await self.webhooks.stop()
        await self.api_keys.stop()
        await self.realtime.close_sockets()
        await self.realtime.stop()
        if self.server is not None:
            await self.server.close_all_connections()
        if self.redis is not None:
            await self.redis.aclose()
        self.application.settings["passwords"].close()
        if self.owns_store:
            await self.store.close()


async def make_app(config: Config, *, store: Store | None = None, provider: Any = None) -> Droid:
    """Build a Droid from its configuration. Call inside the event loop that will run it.

    `store` lets several instances share one store object (tests; the caller closes it);
    `provider` replaces the LLM provider chosen from the configuration.
    """
    logsafe.install()
    owns_store = store is None
    if store is None:
        store = store_from_config(config)
    await store.open()
    metrics = Metrics()
    redis = manager = None
    if config.redis_url:
        from .realtime.cluster import make_manager
        from .realtime.redisconn import make_redis, redis_tls_verify
        redis = make_redis(config.redis_url, tls_verify=redis_tls_verify(config))
        manager = make_manager(config, redis)
    origins = Origins(config.cors_origins)
    tokens = Tokens(config)
    events = EventsService(metrics, relay=manager)
    api_keys = ApiKeys(store, relay=manager)
    realtime = Realtime(config, store=store, tokens=tokens, publisher=events, origins=origins,
                        metrics=metrics, manager=manager, api_keys=api_keys)
    webhooks = Webhooks(config, store, publisher=events, metrics=metrics,
                        notify=realtime.notify)
    tasks = TaskService(store, events, max_retries=config.task_max_retries,
                        retry_backoff_s=config.retry_backoff_s,
                        quota=Quota(config.quota_tasks_per_minute, config.quota_pending_tasks,
                                    config.quota_stored_bytes),
                        max_page_bytes=config.max_page_bytes)
    agents = AgentService(store, default_model=config.llm_model)
    if provider is None:
        provider = make_provider(base_url=config.llm_base_url, api_key=config.llm_api_key,
                                 model=config.llm_model, timeout_s=config.llm_timeout_s,
                                 max_answer_bytes=config.llm_max_answer_bytes,
                                 max_tokens=config.llm_max_tokens,
                                 demo_delay_s=config.demo_delay_s)
    worker = Worker(tasks, agents, provider, concurrency=config.worker_concurrency,
                    timeout_s=config.task_timeout_s, lease_s=config.lease_s,
                    owner=config.instance_id, metrics=metrics,
                    shutdown_grace_s=config.shutdown_grace_s,
                    retry_after_max_s=config.llm_retry_after_max_s)
    passwords = Passwords(config.argon2_concurrency, config.argon2_queue)
    log.info("%s (DROID_ARGON2_CONCURRENCY, DROID_ARGON2_QUEUE)", passwords.describe())
    settings: dict[str, Any] = dict(
        config=config, store=store, tokens=tokens, passwords=passwords, task_service=tasks,
        agent_service=agents, events_service=events, metrics=metrics, origins=origins,
        socket_count=realtime.socket_count, version=__version__,
        openapi=build_openapi(__version__), static_path=static_path(),
        static_handler_class=StaticHandler, default_handler_class=NotFoundHandler,
        log_function=log_request, websocket_max_message_size=MAX_PACKET,
        redis_health=(lambda: _redis_ok(redis)) if redis is not None else None,
        auth_limits=AuthLimits(config.auth_attempts_per_address, config.auth_failures_per_account),
        api_keys=api_keys, webhooks=webhooks,
    )
    routes = [
        (r"/socket.io/", realtime.handler),  # first: every Socket.IO connection and poll is routed
        (r"/auth/register", RegisterHandler),
        (r"/auth/login", LoginHandler),
        (r"/auth/me", MeHandler),
        (r"/agents", AgentsHandler),
        (r"/tasks", TasksHandler),
        (r"/tasks/([^/]+)", TaskHandler),
        (r"/tasks/([^/]+)/cancel", CancelHandler),
        (r"/api-keys", ApiKeysHandler),
        (r"/api-keys/([^/]+)", ApiKeyHandler),
        (r"/webhooks", WebhooksHandler),
        (r"/webhooks/([^/]+)", WebhookHandler),
        (r"/webhooks/([^/]+)/rotate-secret", RotateSecretHandler),
        (r"/webhooks/([^/]+)/test", SendTestHandler),
        (r"/webhooks/([^/]+)/deliveries", DeliveriesHandler),
        (r"/webhooks/([^/]+)/deliveries/([^/]+)/retry", RetryDeliveryHandler),
        (r"/events", EventsHandler),
        (r"/events/stream", EventStreamHandler),
        (r"/metrics", MetricsHandler),
        (r"/health", HealthHandler),
        (r"/openapi.json", OpenApiHandler),
        (r"/", IndexHandler),
    ]
    application = Front(routes, **settings)
    return Droid(config, store=store, realtime=realtime, application=application,
                 worker=worker, tasks=tasks, api_keys=api_keys, webhooks=webhooks,
                 redis=redis, owns_store=owns_store)


async def _redis_ok(redis: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(redis.ping(), 2))
    except Exception:
        return False


__all__ = ["Droid", "make_app", "NAMESPACE"]
