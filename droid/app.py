"""make_app(): the one place where Droid is wired together, and its start/stop lifecycle."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from typing import Any

import socketio
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.log import access_log

from . import __version__, logsafe
from .agents import AgentService
from .apikeys import ApiKeys
from .auth import Passwords, Tokens
from .config import Config
from .cors import Origins, refuse_origins
from .delivery import Delivery, websocket_handler
from .events import NAMESPACE, EventsGateway, EventsService, LocalPresence, presence_room
from .front import Front, server_options
from .guard import GuardedServer, guard_frames, guard_polling
from .handlers.api import (AgentsHandler, CancelHandler, LoginHandler, MeHandler,
                           RegisterHandler, TaskHandler, TasksHandler)
from .handlers.base import NotFoundHandler
from .handlers.keys import ApiKeyHandler, ApiKeysHandler
from .handlers.webhooks import (DeliveriesHandler, RetryDeliveryHandler, RotateSecretHandler,
                                SendTestHandler, WebhookHandler, WebhooksHandler)
from .handlers.events import EventsHandler, EventStreamHandler
from .handlers.system import (HealthHandler, IndexHandler, MetricsHandler, OpenApiHandler,
                              StaticHandler)
from .llm import make_provider
from .metrics import Metrics
from .openapi import build_openapi
from .ratelimit import AuthLimits
from .store import Store, store_from_config
from .tasks import TaskService
from .transport import TransportServer, tornado_handler
from .util import OrjsonModule
from .webhooks import Webhooks
from .worker import Worker

log = logging.getLogger(__name__)

_TOKEN_PARAM = re.compile(r"([?&]token=)[^&]*")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with `?token=` redacted (it carries a bearer token)."""
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


MAX_PACKET = 64 * 1024
# WebSockets through droid/transport.py (True) or python-engineio's own loop (False)
WS_TRANSPORT = True


def socketio_handler(sio: socketio.AsyncServer, delivery: Delivery, compression: bool,
                     origins: Origins) -> type:
    """python-engineio's Tornado handler, with per-message deflate made optional (off by default:
    it costs memory and CPU per socket, and OWASP advises against it), browser origins checked
    first (droid/cors.py), and its WebSocket connections known to the app, which closes them at
    shutdown."""
    if isinstance(sio.eio, TransportServer):  # Droid's WebSocket transport (droid/transport.py)
        sio.eio.on_overflow = delivery.on_shed
        sio.eio.max_buffered_bytes = delivery.max_backlog_bytes  # one slow-consumer bound
        base = refuse_origins(tornado_handler(sio.eio, compression=compression), origins)
    else:
        base = websocket_handler(guard_frames(refuse_origins(socketio.get_tornado_handler(sio),
                                                             origins)), delivery,
                                 compression=compression)
    base = guard_polling(base, sio.eio)  # long-polling POSTs always answered (droid/guard.py)

    class Handler(base):  # type: ignore[misc, valid-type]
        live: set = set()  # open WebSocket connections of this app, closed at shutdown

        async def open(self, *args: Any, **kwargs: Any) -> None:
            Handler.live.add(self)
            await super().open(*args, **kwargs)

        def on_close(self) -> None:
            Handler.live.discard(self)
            super().on_close()

    return Handler


class Droid:
    """One running Droid: HTTP server, Socket.IO server, worker, and the services between them."""

    def __init__(self, config: Config, *, store: Store, sio: socketio.AsyncServer,
                 application: tornado.web.Application, worker: Worker, gateway: EventsGateway,
                 tasks: TaskService, presence: Any, redis: Any = None,
                 owns_store: bool = True, api_keys: ApiKeys | None = None,
                 webhooks: Webhooks | None = None) -> None:
        self.config = config
        self.store = store
        self.sio = sio
        self.application = application
        self.worker = worker
        self.gateway = gateway
        self.tasks = tasks
        self.presence = presence
        self.redis = redis
        self.owns_store = owns_store
        self.api_keys = api_keys
        self.webhooks = webhooks
        self.server: tornado.httpserver.HTTPServer | None = None
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
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        if self.redis is not None:
            await self.sio.manager.start()
        await self.presence.start()
        await self.worker.start()
        if self.api_keys is not None:
            await self.api_keys.start()
        if self.webhooks is not None:
            await self.webhooks.start()

    async def stop(self) -> None:
        """Stop in reverse order of start: listening, the worker, sockets, storage."""
        if self._stopped:
            return
        self._stopped = True
        if self.server is not None:
            self.server.stop()
        await self.worker.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.api_keys is not None:
            await self.api_keys.stop()
        # python-socketio's shutdown stops its background tasks but leaves upgraded WebSocket
        # connections open; close them so that clients reconnect (to another process).
        for handler in list(self.application.settings["ws_handler"].live):
            handler.close(1001, "server shutting down")
        try:
            await asyncio.wait_for(self.sio.shutdown(), 5)
        except Exception:
            log.warning("closing Socket.IO connections did not finish cleanly", exc_info=True)
        await self.gateway.events.delivery.close()
        await self.presence.stop()
        if self.redis is not None:
            await self.sio.manager.close()
        if self.server is not None:
            await self.server.close_all_connections()
        if self.redis is not None:
            await self.redis.aclose()
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
    redis = None
    manager = None
    if config.redis_url:
        from .cluster import make_manager, make_redis, redis_tls_verify
        redis = make_redis(config.redis_url, tls_verify=redis_tls_verify(config))
        manager = make_manager(config, redis)
    origins = Origins(config.cors_origins)
    sio = GuardedServer(
        async_mode="tornado", client_manager=manager, namespaces="*",
        cors_allowed_origins=origins.for_engineio(),
        max_http_buffer_size=MAX_PACKET, json=OrjsonModule, ping_interval=25, ping_timeout=20,
        logger=False, engineio_logger=False, transport=WS_TRANSPORT)
    if redis is not None:
        from .cluster import RedisPresence, presence_ttl_s
        presence: Any = RedisPresence(redis, config.instance_id, sio=sio,
                                      ttl_s=presence_ttl_s(config))
        manager.presence = presence  # connections.count is re-read where it is delivered
    else:
        presence = LocalPresence()
    tokens = Tokens(config)
    events = EventsService(sio, store, metrics, relay=manager,
                           max_backlog_bytes=config.max_backlog_bytes)
    sio.close_transport = events.delivery.close_websocket
    if manager is not None:
        manager.on_envelope = events.receive
        manager.on_resubscribed = events.delivery.catch_up
    tasks = TaskService(store, events, max_retries=config.task_max_retries,
                        retry_backoff_s=config.retry_backoff_s)
    agents = AgentService(store, default_model=config.llm_model)
    gateway = EventsGateway(sio, tokens, events, presence, metrics)
    api_keys = ApiKeys(store, relay=manager)
    gateway.api_keys = api_keys
    api_keys.disconnect = gateway.disconnect_revoked
    if manager is not None:
        manager.on_notice = api_keys.on_notice

    async def notify(user_id: str, event: str, data: dict) -> None:
        # Every socket of the user, on every process (with Redis, python-socketio's room emit).
        await sio.emit(event, data, room=presence_room(user_id), namespace=NAMESPACE)

    webhooks = Webhooks(config, store, metrics=metrics, notify=notify)
    events.on_stored = webhooks.stored
    if provider is None:
        provider = make_provider(base_url=config.llm_base_url, api_key=config.llm_api_key,
                                 model=config.llm_model, timeout_s=config.llm_timeout_s,
                                 demo_delay_s=config.demo_delay_s)
    worker = Worker(tasks, agents, provider, concurrency=config.worker_concurrency,
                    timeout_s=config.task_timeout_s, lease_s=config.lease_s,
                    owner=config.instance_id, metrics=metrics,
                    shutdown_grace_s=config.shutdown_grace_s)
    settings: dict[str, Any] = dict(
        config=config, store=store, tokens=tokens, passwords=Passwords(), task_service=tasks,
        agent_service=agents, events_service=events, gateway=gateway, metrics=metrics,
        version=__version__, openapi=build_openapi(__version__), static_path=static_path(),
        static_handler_class=StaticHandler,
        default_handler_class=NotFoundHandler, log_function=log_request, websocket_max_message_size=MAX_PACKET,
        redis_health=(lambda: _redis_ok(redis)) if redis is not None else None,
        auth_limits=AuthLimits(config.auth_attempts_per_address, config.auth_failures_per_account),
        api_keys=api_keys, webhooks=webhooks,
    )
    ws_handler = socketio_handler(sio, events.delivery, config.ws_compression, origins)
    routes = [
        (r"/socket.io/", ws_handler),  # first: every Socket.IO connection and poll is routed
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
    application = Front(routes, ws_handler=ws_handler, **settings)
    return Droid(config, store=store, sio=sio, application=application, worker=worker,
                 gateway=gateway, tasks=tasks, presence=presence, redis=redis,
                 owns_store=owns_store, api_keys=api_keys, webhooks=webhooks)


async def _redis_ok(redis: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(redis.ping(), 2))
    except Exception:
        return False


__all__ = ["Droid", "make_app", "NAMESPACE"]
